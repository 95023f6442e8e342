"""TFDS builders of the drifting-digits image benchmark (array_record, no TensorFlow).

`drifting_digits_cloud`   split global_train: one example per image (image, label), the cloud's
                          pooled data for the global model, from devices and digit instances no
                          other split uses.
`drifting_digits_devices` splits validation / test / test_ood: one example per device, its
                          stream of W windows: each role [W, n, ...] and the shift of every
                          window (`shift/<key>` [W, ...], `shift/jumped` marks a redraw).
Meta-training windows are not stored: `drifting_digits.meta_window` draws fresh ones with the
same code. Config names hash the data config and the generator's version (as the moving-digits
builders do, whose plumbing these share).
"""
import numpy as np
import tensorflow_datasets as tfds

from mmpg_jax.data import drifting_digits as dd
from mmpg_jax.data import threads
from mmpg_jax.data import tfds_moving_digits as tmd

DEVICE_SPLITS = tmd.DEVICE_SPLITS


class DriftingDigitsCloud(tmd._Base):
  """The cloud's pooled training images: split `global_train`, one example per image."""

  GENERATOR_VERSION = dd.GENERATOR_VERSION

  def _info(self):
    s = self.builder_config.data["size"]
    return self._info_from({"image": tfds.features.Tensor(shape=(s, s), dtype=np.uint8),
                            "label": np.int32, "device_id": np.int32})

  def _split_generators(self, dl_manager):
    return {"global_train": self._generate_examples()}

  def expected_sizes(self):
    cfg = self.builder_config.data
    return {"global_train": cfg["num_global_devices"] * cfg["global_images_per_device"]}

  def _generate_examples(self):
    cfg = self.builder_config.data
    n = cfg["global_images_per_device"]
    devices = threads.ordered_map(lambda d: dd.make_global_train_device(cfg, d, n),
                                  range(cfg["num_global_devices"]))
    for d, imgs in enumerate(devices):
      for i in range(n):
        yield d * n + i, {"image": imgs["image"][i], "label": imgs["label"][i],
                          "device_id": np.int32(d)}


class DriftingDigitsDevices(tmd._Base):
  """Evaluation devices: one example per device, its W windows' roles and shifts."""

  GENERATOR_VERSION = dd.GENERATOR_VERSION

  def _info(self):
    cfg = self.builder_config.data
    s, w = cfg["size"], cfg["drift"]["windows"]
    shift = {"rotation": tfds.features.Tensor(shape=(w,), dtype=np.float32),
             "thickness": tfds.features.Tensor(shape=(w,), dtype=np.int32),
             "invert": tfds.features.Tensor(shape=(w,), dtype=np.bool_),
             "noise": tfds.features.Tensor(shape=(w,), dtype=np.float32),
             "blur": tfds.features.Tensor(shape=(w,), dtype=np.float32),
             "clutter_strength": tfds.features.Tensor(shape=(w,), dtype=np.float32),
             "label_prior": tfds.features.Tensor(shape=(w, dd.NUM_CLASSES), dtype=np.float32),
             "jumped": tfds.features.Tensor(shape=(w,), dtype=np.bool_)}
    device = {"device_id": np.int32, "shift": tfds.features.FeaturesDict(shift)}
    for role, n in dd.device_roles(cfg, "test").items():
      f = {"image": tfds.features.Tensor(shape=(w, n, s, s), dtype=np.uint8)}
      if role != "context":
        f["label"] = tfds.features.Tensor(shape=(w, n), dtype=np.int32)
      device[role] = tfds.features.FeaturesDict(f)
    return self._info_from(device)

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in DEVICE_SPLITS}

  def expected_sizes(self):
    return tmd.device_split_sizes(self.builder_config.data)

  def _generate_examples(self, split):
    cfg = self.builder_config.data
    roles = dd.device_roles(cfg, split)
    devices = threads.ordered_map(lambda d: dd.make_device(cfg, split, d, roles),
                                  range(tmd.device_split_sizes(cfg)[split]))
    yield from enumerate(devices)
