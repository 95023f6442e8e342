"""TFDS builders of the embedded benchmark (array_record, readable without TensorFlow).

`moving_digits_cloud`   split global_train: one example per video, every question type answered,
                        its caption and caption content; the cloud's pooled data for the
                        global model.
`moving_digits_devices` splits validation / test / test_ood / val_ood: one example per device
                        with its roles (context, support, query, oracle) and its shift
                        parameters. validation is for model selection; test is touched only
                        by the final evaluation; test_ood's shift parameters never occur in
                        training; val_ood is a held-out shift family disjoint from test_ood's,
                        on which robustness choices are made.
Meta-training devices are not stored: `moving_digits.make_device(cfg, "meta", i, ...)` draws as
many fresh ones as a method wants with the same code (see `pipeline.MetaDeviceSampler`).

A builder's config name is a hash of the data config, so every distinct data config gets its own
prepared copy under `data_dir`, and a rerun reuses it.
"""
import hashlib
import json

import numpy as np
import tensorflow_datasets as tfds

from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import threads

DEVICE_SPLITS = ("validation", "test", "test_ood", "val_ood")


def data_config_dict(data_cfg) -> dict:
  """The fields of the data config that determine the bytes of the dataset."""
  d = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  d.pop("data_dir", None)
  return json.loads(json.dumps(d, sort_keys=True, default=list))


def config_name(data_cfg, generator_version: int = md.GENERATOR_VERSION) -> str:
  """A hash of the data config and the generator's version: a rebuild whenever either moves."""
  blob = json.dumps({**data_config_dict(data_cfg), "_generator": generator_version},
                    sort_keys=True).encode()
  return "cfg_" + hashlib.sha256(blob).hexdigest()[:12]


class MovingDigitsConfig(tfds.core.BuilderConfig):

  def __init__(self, data_cfg, generator_version: int = md.GENERATOR_VERSION):
    super().__init__(name=config_name(data_cfg, generator_version), version="1.0.0",
                     description="generated benchmark; data config in self.data")
    self.data = data_config_dict(data_cfg)


def _role_features(cfg, n, labelled):
  t, s, q, c = cfg["frames"], cfg["size"], cfg["question_len"], cfg["caption_len"]
  f = {"video": tfds.features.Tensor(shape=(n, t, s, s), dtype=np.uint8),
       "question": tfds.features.Tensor(shape=(n, q), dtype=np.int32),
       "qtype": tfds.features.Tensor(shape=(n,), dtype=np.int32),
       "caption": tfds.features.Tensor(shape=(n, c), dtype=np.int32)}
  if labelled:
    f["answer"] = tfds.features.Tensor(shape=(n,), dtype=np.int32)
    f["content"] = tfds.features.Tensor(shape=(n,), dtype=np.int32)
  return tfds.features.FeaturesDict(f)


def device_split_sizes(cfg) -> dict:
  """{split: devices} of the evaluation splits."""
  return {"validation": cfg["num_val_devices"], "test": cfg["num_test_devices"],
          "test_ood": cfg["num_ood_devices"], "val_ood": cfg.get("num_val_ood_devices", 0)}


class _Base(tfds.core.GeneratorBasedBuilder):
  """Shared config plumbing of the generated benchmarks: `data_cfg` (the ml_collections data
  config) and the generator's version pick the config. `expected_sizes()` -> {split: number of
  examples} lets `pipeline.Benchmark.verify` check any of them."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  GENERATOR_VERSION = md.GENERATOR_VERSION

  def __init__(self, *, data_cfg=None, **kwargs):
    if data_cfg is not None:
      kwargs["config"] = MovingDigitsConfig(data_cfg, self.GENERATOR_VERSION)
    kwargs.setdefault("file_format", "array_record")   # tfrecord would need TensorFlow
    super().__init__(**kwargs)

  def _info_from(self, features):
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=tfds.features.FeaturesDict(features),
        disable_shuffling=True)   # ds[i] is video / device i, in generation order


class MovingDigitsCloud(_Base):
  """The cloud's pooled training data: split `global_train`, one example per video, every
  question type answered, from devices (and digit instances) that no other split uses."""

  def _info(self):
    cfg = self.builder_config.data
    t, s, q, c = cfg["frames"], cfg["size"], cfg["question_len"], cfg["caption_len"]
    nq = len(md.QUESTION_TYPES)
    return self._info_from({
        "video": tfds.features.Tensor(shape=(t, s, s), dtype=np.uint8),
        "questions": tfds.features.Tensor(shape=(nq, q), dtype=np.int32),
        "answers": tfds.features.Tensor(shape=(nq,), dtype=np.int32),
        "caption": tfds.features.Tensor(shape=(c,), dtype=np.int32),
        "content": np.int32, "device_id": np.int32})

  def _split_generators(self, dl_manager):
    return {"global_train": self._generate_examples()}

  def expected_sizes(self):
    cfg = self.builder_config.data
    return {"global_train": cfg["num_global_devices"] * cfg["global_videos_per_device"]}

  def _generate_examples(self):
    cfg = self.builder_config.data
    n = cfg["global_videos_per_device"]
    devices = threads.ordered_map(lambda d: md.make_global_train_device(cfg, d, n),
                                  range(cfg["num_global_devices"]))
    for d, vids in enumerate(devices):
      for i in range(n):
        ex = {k: v[i] for k, v in vids.items()}
        ex["device_id"] = np.int32(d)
        yield d * n + i, ex


class MovingDigitsDevices(_Base):
  """Evaluation devices, one example per device with its roles (context without answers,
  support, query, oracle) and its shift parameters: splits validation, test, test_ood and
  val_ood (the held-out shift family robustness choices are made on)."""

  def _info(self):
    cfg = self.builder_config.data
    s, nq = cfg["size"], len(md.QUESTION_TYPES)
    shift = {"rotation": np.float32, "thickness": np.int32, "invert": np.bool_,
             "noise": np.float32, "blur": np.float32,
             "background": tfds.features.Tensor(shape=(s, s), dtype=np.float32),
             "label_prior": tfds.features.Tensor(shape=(10,), dtype=np.float32),
             "motion_prior": tfds.features.Tensor(shape=(len(md.DIRECTIONS),), dtype=np.float32),
             "question_mix": tfds.features.Tensor(shape=(nq,), dtype=np.float32),
             "caption_mix": tfds.features.Tensor(shape=(md.MAX_CAPTION_TEMPLATES,),
                                                 dtype=np.float32),
             "digit_forms": tfds.features.Tensor(shape=(len(md.DIGIT_FORMS),),
                                                 dtype=np.float32),
             "direction_forms": tfds.features.Tensor(shape=(len(md.DIRECTION_FORMS),),
                                                     dtype=np.float32)}
    device = {"device_id": np.int32, "shift": tfds.features.FeaturesDict(shift)}
    for role, n in md.device_roles(cfg, "test").items():
      device[role] = _role_features(cfg, n, labelled=(role != "context"))
    return self._info_from(device)

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in DEVICE_SPLITS}

  def expected_sizes(self):
    return device_split_sizes(self.builder_config.data)

  def _generate_examples(self, split):
    cfg = self.builder_config.data
    roles = md.device_roles(cfg, split)
    devices = threads.ordered_map(lambda d: md.make_device(cfg, split, d, roles),
                                  range(device_split_sizes(cfg)[split]))
    yield from enumerate(devices)
