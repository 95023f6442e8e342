"""TFDS builders of MovieLens-100K for sequential recommendation (array_record, no TensorFlow),
from the RecBole wheel's files, preprocessed by `movielens.preprocess`.

`movielens_cloud`    split global_train: one example per training position of a warm user
                     (user-major, time order): its click window, 1 + train_negatives
                     candidates (positive first) and labels. The global model trains on these;
                     meta-training draws its labelled windows from them.
`movielens_devices`  splits validation / test (warm users at their second-to-last and last
                     click) and test_ood (the cold users at their last click): one example per
                     user, its target (window, 1 + eval_negatives candidates, labels) and its
                     labelled support from its own earlier clicks.
Config names hash the data config and the preprocessing's version, as the generated
benchmarks' builders do (whose plumbing these share).
"""
import functools
import json

import numpy as np
import tensorflow_datasets as tfds

from mmpg_jax.data import movielens as ml
from mmpg_jax.data import tfds_moving_digits as tmd

DEVICE_SPLITS = tmd.DEVICE_SPLITS


@functools.lru_cache(maxsize=4)
def _prepared(cfg_json: str) -> ml.Prepared:
  return ml.preprocess(json.loads(cfg_json))


def prepared(cfg) -> ml.Prepared:
  """The preprocessed clicks of a data config (cached: both builders and the task read it)."""
  return _prepared(json.dumps(tmd.data_config_dict(cfg), sort_keys=True))


def _target_features(window, n):
  return tfds.features.FeaturesDict({
      "window": tfds.features.Tensor(shape=(window,), dtype=np.int32),
      "candidates": tfds.features.Tensor(shape=(n,), dtype=np.int32),
      "label": tfds.features.Tensor(shape=(n,), dtype=np.float32)})


class MovielensCloud(tmd._Base):
  """The cloud's training positions: split `global_train`, one example per position."""

  GENERATOR_VERSION = ml.GENERATOR_VERSION

  def _info(self):
    cfg = self.builder_config.data
    n = 1 + cfg["train_negatives"]
    return self._info_from({"user": np.int32, "position": np.int32, "timestamp": np.int64,
                            "window": tfds.features.Tensor(shape=(cfg["window"],),
                                                           dtype=np.int32),
                            "candidates": tfds.features.Tensor(shape=(n,), dtype=np.int32),
                            "label": tfds.features.Tensor(shape=(n,), dtype=np.float32)})

  def _split_generators(self, dl_manager):
    return {"global_train": self._generate_examples()}

  def expected_sizes(self):
    return {"global_train": prepared(self.builder_config.data).figures(
        self.builder_config.data)["training_positions"]}

  def _generate_examples(self):
    cfg = self.builder_config.data
    for i, (u, t, pos) in enumerate(ml.global_rows(prepared(cfg), cfg)):
      yield i, {"user": np.int32(u), "position": np.int32(t), **pos}


class MovielensDevices(tmd._Base):
  """Evaluation devices (users), one example each: splits validation, test, test_ood."""

  GENERATOR_VERSION = ml.GENERATOR_VERSION

  def _info(self):
    cfg = self.builder_config.data
    w, s, nt = cfg["window"], cfg["support_positions"], 1 + cfg["train_negatives"]
    support = tfds.features.FeaturesDict({
        "window": tfds.features.Tensor(shape=(s, w), dtype=np.int32),
        "candidates": tfds.features.Tensor(shape=(s, nt), dtype=np.int32),
        "label": tfds.features.Tensor(shape=(s, nt), dtype=np.float32),
        "mask": tfds.features.Tensor(shape=(s,), dtype=np.float32)})
    return self._info_from({"user": np.int32, "timestamp": np.int64,
                            "target": _target_features(w, 1 + cfg["eval_negatives"]),
                            "support": support})

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in DEVICE_SPLITS}

  def expected_sizes(self):
    f = prepared(self.builder_config.data).figures(self.builder_config.data)
    return {"validation": f["validation_users"], "test": f["test_users"],
            "test_ood": f["test_ood_users"]}

  def _generate_examples(self, split):
    cfg = self.builder_config.data
    prep = prepared(cfg)
    for i, u in enumerate(ml.eval_users(prep, split)):
      yield i, ml.eval_device(prep, cfg, split, int(u))
