"""Reading the embedded benchmark: prepare the TFDS data, batches for the cloud, devices.

* `prepare(data_cfg)` builds the TFDS datasets once (array_record) and returns a `Benchmark`.
* `Benchmark.global_batches(batch_size, seed)` is a grain MapDataset: batch i is a pure
  function of (seed, i), so a resumed run sees exactly the batches it would have seen.
* `Benchmark.devices(split)` loads a device split into memory, stacked over devices.
* `MetaDeviceSampler` draws fresh meta-training devices with the builder's own generator.
"""
import dataclasses
import os
import time

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from mmpg_jax.core.config_errors import need
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import tfds_moving_digits as tmd

tfds.disable_progress_bar()


class DataError(RuntimeError):
  """Prepared data is missing, truncated or malformed."""


def _damaged(builder, what, e):
  return DataError(
      f"the prepared data in {builder.data_dir} is damaged or incomplete ({what}: "
      f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Delete that folder "
      f"and rerun: it is rebuilt from the generator (about 30 s); nothing else is lost.")


def default_data_dir() -> str:
  return os.environ.get("MMPG_DATA_DIR", os.path.expanduser("~/.cache/mmpg_jax/tfds"))


@dataclasses.dataclass
class Benchmark:
  cfg: dict
  cloud: tfds.core.DatasetBuilder
  devices_builder: tfds.core.DatasetBuilder

  def global_source(self):
    try:
      return self.cloud.as_data_source(split="global_train")
    except Exception as e:
      raise _damaged(self.cloud, "opening split global_train", e) from e

  def global_batches(self, batch_size: int, seed: int) -> grain.MapDataset:
    """Batch i of the cloud's training data: a seeded per-epoch shuffle, a function of (seed,
    i) only. A source of at most IN_MEMORY_BYTES is read once into arrays and batches are
    gathered from them in the same order (the same batches, without decoding every example
    again each epoch: for small examples the decoding costs ten times the training step)."""
    src = self.global_source()
    if len(src) < batch_size:
      raise ValueError(f"global_train has {len(src)} examples, fewer than train.batch_size="
                       f"{batch_size}; raise data.num_global_devices or lower the batch size")
    if _nbytes(src[0]) * len(src) <= IN_MEMORY_BYTES:
      order = (grain.MapDataset.range(len(src)).shuffle(seed=seed).repeat(None)
               .batch(batch_size, drop_remainder=True))
      return _InMemory(order, self._global_arrays(src))
    ds = (grain.MapDataset.source(src).shuffle(seed=seed).repeat(None)
          .map(lambda e: {k: np.asarray(v) for k, v in e.items()})
          .batch(batch_size, drop_remainder=True))
    return _Checked(ds, self.cloud)

  def _global_arrays(self, src) -> dict:
    t = time.time()
    try:
      examples = src.__getitems__(list(range(len(src))))
    except Exception as e:
      raise _damaged(self.cloud, "reading split global_train", e) from e
    arrays = _stack(examples)
    logging.info("read the %d cloud training examples into memory in %.1fs", len(src),
                 time.time() - t)
    return arrays

  def devices(self, split: str) -> dict:
    """All devices of a split, stacked: role fields get a leading device axis."""
    if split not in tmd.DEVICE_SPLITS:
      raise ValueError(f"unknown device split {split!r}; expected one of {tmd.DEVICE_SPLITS}")
    try:
      src = self.devices_builder.as_data_source(split=split)
      exs = [src[i] for i in range(len(src))]
    except Exception as e:
      raise _damaged(self.devices_builder, f"reading split {split}", e) from e
    return _stack(exs)

  def verify(self):
    """Opens every split, checks its size against the config and decodes its first and last
    examples, so damaged files fail here, with a message, and not mid-run."""
    for builder in (self.cloud, self.devices_builder):
      for split, n in builder.expected_sizes().items():
        if n == 0:
          continue
        try:
          src = builder.as_data_source(split=split)
          if len(src) != n:
            raise ValueError(f"{len(src)} examples, expected {n}")
          src[0], src[n - 1]
        except Exception as e:
          raise _damaged(builder, f"split {split}", e) from e


IN_MEMORY_BYTES = 256 * 2 ** 20


def _nbytes(example) -> int:
  if isinstance(example, dict):
    return sum(_nbytes(v) for v in example.values())
  return np.asarray(example).nbytes


class _InMemory:
  """Batches gathered from arrays by a grain index order (batch i = arrays[order[i]])."""

  def __init__(self, order, arrays):
    self._order, self._arrays = order, arrays

  def __getitem__(self, i):
    idx = np.asarray(self._order[i])
    return jax.tree.map(lambda a: a[idx], self._arrays)


class _Checked:
  """A batch source whose read errors name the data folder and the fix."""

  def __init__(self, ds, builder):
    self._ds, self._builder = ds, builder

  def __getitem__(self, i):
    try:
      return self._ds[i]
    except Exception as e:
      raise _damaged(self._builder, f"reading batch {i}", e) from e


def _stack(examples):
  first = examples[0]
  if isinstance(first, dict):
    return {k: _stack([e[k] for e in examples]) for k in first}
  return np.stack([np.asarray(e) for e in examples])


def prepare(data_cfg, data_dir: str | None = None,
            builders=(tmd.MovingDigitsCloud, tmd.MovingDigitsDevices)) -> Benchmark:
  """Builds (once) and opens a generated benchmark for this data config: `builders` are its
  (cloud, devices) TFDS builder classes (default: the moving-digits video benchmark)."""
  data_dir = data_dir or data_cfg.get("data_dir") or default_data_dir()
  cloud = builders[0](data_cfg=data_cfg, data_dir=data_dir)
  devices = builders[1](data_cfg=data_cfg, data_dir=data_dir)
  for b in (cloud, devices):
    existed = os.path.exists(b.data_dir)
    try:
      b.download_and_prepare()
    except Exception as e:
      if not existed:
        raise            # a fresh build failed: the generator's own error says why
      raise _damaged(b, "opening the prepared copy", e) from e
  bench = Benchmark(cfg=tmd.data_config_dict(data_cfg), cloud=cloud, devices_builder=devices)
  bench.verify()
  return bench


def validate_data_config(cfg) -> None:
  """The moving-digits data values a task on this benchmark relies on (ConfigError names the
  key and the fix)."""
  d = cfg.data
  need(d.frames >= 2, "data.frames", d.frames, "need at least 2 frames: anchors carry the "
       "temporal difference between consecutive frames, and motion needs 2 frames")
  room = d.size - 20
  need(d.speed * (d.frames - 1) <= room, "data.speed", d.speed,
       f"a digit moving {d.speed} px/frame for {d.frames - 1} steps leaves a {d.size}px frame "
       f"(room {room}px); lower data.speed or data.frames, or raise data.size")
  mix = tuple(d.cloud_caption_mix)
  need(len(mix) == len(md.CAPTION_TEMPLATES) and min(mix) >= 0 and sum(mix) > 0,
       "data.cloud_caption_mix", mix, f"{len(md.CAPTION_TEMPLATES)} non-negative weights, one "
       f"per caption phrasing {md.CAPTION_TEMPLATES}")
  for key, forms in (("cloud_digit_forms", md.DIGIT_FORMS),
                     ("cloud_direction_forms", md.DIRECTION_FORMS)):
    mix = tuple(d[key])
    need(len(mix) == len(forms) and min(mix) >= 0 and sum(mix) > 0, f"data.{key}", mix,
         f"{len(forms)} non-negative weights, one per word form {forms}")
  need(d.caption_concentration > 0, "data.caption_concentration", d.caption_concentration,
       "the Dirichlet concentration of a device's phrasing mix must be > 0")
  check_held_out_families(d)


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


def resolve_widen(data_cfg, overrides) -> dict:
  """Overrides carrying a stated widening rule, {"widen": {"factor", "families"}} (at the top:
  every meta device; inside "meta_wide": its share), with the rule turned into data.shift
  ranges by `moving_digits.widen`: the data layer owns what widening a shift means."""
  def one(o):
    o = dict(o)
    rule = o.pop("widen", None)
    if rule is not None:
      o["shift"] = {**dict(o.get("shift", {})),
                    **md.widen(data_cfg.shift, float(rule["factor"]), tuple(rule["families"]))}
    return o
  out = one(overrides)
  if "meta_wide" in out:
    out["meta_wide"] = one(out["meta_wide"])
  return out


def check_meta_shift(data_cfg, overrides) -> None:
  """Meta-training may draw from a wider shift distribution than the evaluation devices —
  `overrides['shift']` (every meta device) or `overrides['meta_wide']` = {'fraction', 'shift'}
  (that fraction of them; the rest from the training ranges) — but never a value that only a
  held-out group (test OOD, validation OOD) shows: for each continuous shift, no interval of
  the meta ranges may meet a held-out range outside the training ranges; for each discrete
  one, no held-out value training lacks."""
  overrides = resolve_widen(data_cfg, overrides)
  unknown = set(overrides) - {"shift", "meta_wide", "caption_noise"}
  need(not unknown, "cdc_robust.wide_data", dict(overrides),
       "only data.shift (or meta_wide, caption_noise) may change for meta-training (not "
       f"{sorted(unknown)})")
  _check_ranges(data_cfg, overrides.get("shift", {}), "cdc_robust.wide_data.shift")
  if "caption_noise" in overrides:
    # UNK and the caption's own words in another order: never an OOD phrasing's words.
    noise = overrides["caption_noise"]
    need(set(noise) == {"unk", "shuffle"}, "cdc_robust.caption_noise", noise,
         "ranges 'unk' and 'shuffle' (probabilities per word and per caption)")
    for k, r in noise.items():
      need(all(0.0 <= lo <= hi <= 1.0 for lo, hi in md.intervals(r)),
           f"cdc_robust.caption_noise.{k}", r, "a range (lo, hi) of probabilities in [0, 1]")
  if "meta_wide" in overrides:
    mix = overrides["meta_wide"]
    need(0.0 <= mix["fraction"] <= 1.0, "cdc_robust.wide_mix_fraction", mix["fraction"],
         "a share of meta devices, in [0, 1]")
    _check_ranges(data_cfg, mix["shift"], "cdc_robust.wide_data.shift")


# The held-out groups: (split, its data.<ranges> key, its data.<count> key).
HELD_OUT = (("test_ood", "ood_shift", "num_ood_devices"),
            ("val_ood", "val_ood_shift", "num_val_ood_devices"))


def held_out_groups(data_cfg) -> dict:
  """{split: shift ranges} of the held-out groups this config has devices in."""
  return {split: data_cfg[key] for split, key, count in HELD_OUT
          if key in data_cfg and data_cfg.get(count, 0) > 0}


def _values(v) -> set:
  """A discrete shift value (an int, a float, a tuple of choices) as a set."""
  return {float(x) for x in np.ravel(np.asarray(v, np.float64))}


def shift_family(data_cfg, ranges) -> set:
  """The shift keys whose ranges in `ranges` differ from training's: a group's family."""
  return {k for k in ranges if k in data_cfg.shift
          and _values(ranges[k]) != _values(data_cfg.shift[k])}


def check_held_out_families(data_cfg) -> None:
  """The validation OOD group's shift family is disjoint from the test OOD group's: robustness
  choices made on val_ood never see the kind of shift test_ood measures."""
  groups = held_out_groups(data_cfg)
  if "val_ood" not in groups:
    return
  val = shift_family(data_cfg, groups["val_ood"])
  need(bool(val), "data.val_ood_shift", sorted(val), "a shift family of its own: at least one "
       "range that differs from training's (data.shift)")
  if "test_ood" in groups:
    test = shift_family(data_cfg, groups["test_ood"])
    need(not (val & test), "data.val_ood_shift", sorted(val & test),
         f"a family disjoint from the test OOD group's ({sorted(test)}): robustness choices "
         f"are made on val_ood, so it must not preview the shift test_ood measures")


def _check_ranges(data_cfg, shift, key_name) -> None:
  """Meta shift ranges never draw a value only a held-out group (test_ood, val_ood) shows:
  continuous ranges by interval, discrete keys (stroke thickness, clutter fragments, ...) by
  value."""
  bad = set(shift) - set(data_cfg.shift)
  need(not bad, key_name, sorted(bad), f"known: {sorted(data_cfg.shift)}")
  for group, ranges in held_out_groups(data_cfg).items():
    for key in shift:
      if key not in md.CONTINUOUS_SHIFTS:
        extra = (_values(shift[key]) & _values(ranges[key])) - _values(data_cfg.shift[key])
        need(not extra, f"{key_name}.{key}", shift[key],
             f"it draws {sorted(extra)}, values of the {group} group's {key} that training "
             f"never draws")
        continue
      train = md.intervals(data_cfg.shift[key])
      for lo, hi in md.intervals(ranges[key]):
        # the held-out-only part of [lo, hi]: what the training ranges do not cover
        for mlo, mhi in md.intervals(shift[key]):
          a, b = max(lo, mlo), min(hi, mhi)
          covered = any(tlo <= a and b <= thi for tlo, thi in train)
          need(a >= b or covered,
               f"{key_name}.{key}", shift[key],
               f"it draws {a:g}..{b:g}, inside the {group} group's range {lo:g}..{hi:g} that "
               f"training never draws; leave a gap around it")
