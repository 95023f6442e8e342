"""Reading the embedded benchmark: prepare the TFDS data, batches for the cloud, devices.

* `prepare(data_cfg)` builds the TFDS datasets once (array_record) and returns a `Benchmark`.
* `Benchmark.global_batches(batch_size, seed)` is a grain MapDataset: batch i is a pure
  function of (seed, i), so a resumed run sees exactly the batches it would have seen.
* `Benchmark.devices(split)` loads a device split into memory, stacked over devices.
* `MetaDeviceSampler` draws fresh meta-training devices with the builder's own generator.
"""
import dataclasses
import os

import grain
import numpy as np
import tensorflow_datasets as tfds

from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import tfds_moving_digits as tmd

tfds.disable_progress_bar()


def default_data_dir() -> str:
  return os.environ.get("MMPG_DATA_DIR", os.path.expanduser("~/.cache/mmpg_jax/tfds"))


@dataclasses.dataclass
class Benchmark:
  cfg: dict
  cloud: tfds.core.DatasetBuilder
  devices_builder: tfds.core.DatasetBuilder

  def global_source(self):
    return self.cloud.as_data_source(split="global_train")

  def global_batches(self, batch_size: int, seed: int) -> grain.MapDataset:
    src = self.global_source()
    if len(src) < batch_size:
      raise ValueError(f"global_train has {len(src)} videos, fewer than train.batch_size="
                       f"{batch_size}; raise data.num_global_devices or lower the batch size")
    return (grain.MapDataset.source(src).shuffle(seed=seed).repeat(None)
            .map(lambda e: {k: np.asarray(v) for k, v in e.items()})
            .batch(batch_size, drop_remainder=True))

  def devices(self, split: str) -> dict:
    """All devices of a split, stacked: role fields get a leading device axis."""
    if split not in tmd.DEVICE_SPLITS:
      raise ValueError(f"unknown device split {split!r}; expected one of {tmd.DEVICE_SPLITS}")
    src = self.devices_builder.as_data_source(split=split)
    exs = [src[i] for i in range(len(src))]
    return _stack(exs)


def _stack(examples):
  first = examples[0]
  if isinstance(first, dict):
    return {k: _stack([e[k] for e in examples]) for k in first}
  return np.stack([np.asarray(e) for e in examples])


def prepare(data_cfg, data_dir: str | None = None) -> Benchmark:
  """Builds (once) and opens the benchmark for this data config."""
  data_dir = data_dir or data_cfg.get("data_dir") or default_data_dir()
  cloud = tmd.MovingDigitsCloud(data_cfg=data_cfg, data_dir=data_dir)
  devices = tmd.MovingDigitsDevices(data_cfg=data_cfg, data_dir=data_dir)
  for b in (cloud, devices):
    b.download_and_prepare()
  return Benchmark(cfg=tmd.data_config_dict(data_cfg), cloud=cloud, devices_builder=devices)


class MetaDeviceSampler:
  """Fresh meta-training devices on the fly (same generator as the builder, split 'meta').

  Device i of the meta split is a pure function of (data seed, i); step s of a meta-training
  run uses devices [s*n, (s+1)*n), so no device is reused until the index range wraps.
  `labelled=True` gives the cloud's view (every question answered, context included), which
  only cloud-side meta-training may use.
  """

  def __init__(self, data_cfg, roles=None, num_devices: int = 1_000_000, labelled=False):
    self.cfg = tmd.data_config_dict(data_cfg)
    self.roles = roles or md.device_roles(self.cfg, "meta")
    self.num_devices = num_devices
    self._make = md.make_cloud_device if labelled else md.make_device

  def device(self, index: int) -> dict:
    return self._make(self.cfg, "meta", index % self.num_devices, self.roles)

  def batch(self, step: int, n: int) -> dict:
    return _stack([self.device(step * n + j) for j in range(n)])
