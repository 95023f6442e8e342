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
from mmpg_jax.data import seqrec_text
from mmpg_jax.data import tfds_moving_digits as tmd

DEVICE_SPLITS = tmd.DEVICE_SPLITS


@functools.lru_cache(maxsize=4)
def _prepared(cfg_json: str):
  cfg = json.loads(cfg_json)
  if cfg.get("name") == "seqrec_text":
    return seqrec_text.TextSource(cfg)
  return ml.preprocess(cfg)


def prepared(cfg):
  """The data source of a data config (cached: both builders and the task read it):
  MovieLens-100K preprocessed (`movielens.Prepared`, data.name "movielens") or files in the
  official text format (`seqrec_text.TextSource`, data.name "seqrec_text"). Both give
  num_items, figures(cfg), describe(cfg), global_rows(cfg), eval_users(split) and
  eval_device(cfg, split, user)."""
  d = tmd.data_config_dict(cfg)
  if d.get("name") == "seqrec_text":     # the files' state is part of the key: an edited file
    d["_files"] = seqrec_text.file_fingerprint(d.get("manual_dir", ""))   # is read anew
  return _prepared(json.dumps(d, sort_keys=True))


class _MovielensBase(tmd._Base):
  """The generated benchmarks' config plumbing; for text files the config name also hashes
  their sizes and times, so a changed file is prepared anew."""

  GENERATOR_VERSION = ml.GENERATOR_VERSION

  def __init__(self, *, data_cfg=None, **kwargs):
    if data_cfg is not None:
      data_cfg = tmd.data_config_dict(data_cfg)
      if data_cfg.get("name") == "seqrec_text":
        data_cfg["_files"] = seqrec_text.file_fingerprint(data_cfg.get("manual_dir", ""))
    super().__init__(data_cfg=data_cfg, **kwargs)


def _target_features(window, n):
  return tfds.features.FeaturesDict({
      "window": tfds.features.Tensor(shape=(window,), dtype=np.int32),
      "candidates": tfds.features.Tensor(shape=(n,), dtype=np.int32),
      "label": tfds.features.Tensor(shape=(n,), dtype=np.float32)})


class MovielensCloud(_MovielensBase):
  """The cloud's training positions: split `global_train`, one example per position."""

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
    for i, (u, t, pos) in enumerate(prepared(cfg).global_rows(cfg)):
      yield i, {"user": np.int32(u), "position": np.int32(t), **pos}


class MovielensDevices(_MovielensBase):
  """Evaluation devices (users), one example each: splits validation, test, test_ood."""

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
    # an empty group (no cold users under the official protocol) is no split at all
    sizes = self.expected_sizes()
    return {s: self._generate_examples(s) for s in DEVICE_SPLITS if sizes[s] > 0}

  def expected_sizes(self):
    f = prepared(self.builder_config.data).figures(self.builder_config.data)
    return {"validation": f["validation_users"], "test": f["test_users"],
            "test_ood": f["test_ood_users"], "val_ood": 0}

  def _generate_examples(self, split):
    cfg = self.builder_config.data
    prep = prepared(cfg)
    for i, u in enumerate(prep.eval_users(split)):
      yield i, prep.eval_device(cfg, split, int(u))
