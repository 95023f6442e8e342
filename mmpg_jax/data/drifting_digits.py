"""Handwritten digits under real-time device shift: each device is a stream of windows.

The generator behind the embedded image-classification benchmark. Pure
numpy and deterministic: a device is a function of (data seed, split, device index) only, so
the TFDS builders (`tfds_drifting_digits.py`) and the on-the-fly sampler of fresh
meta-training windows run the same code and agree bit for bit.

A device's distribution has the shift families of the video benchmark (moving_digits): stroke
thickness, rotation, contrast inversion, a static clutter background, blur, pixel noise and a
label prior. Here it *moves*: window w+1's shift is window w's after one drift step
(`drift_step`): the label prior moves as a stationary Dirichlet process, rotation, clutter,
noise and blur take Gaussian steps reflected inside the split's ranges, the stroke thickness
occasionally moves by one, and with probability `drift.jump_prob` the whole shift is redrawn
(a jump: the device's user changed, or its camera). So what a device saw an hour ago is not
what it sees now.

Per window the roles are those of the video benchmark: `context` (the recent unlabelled images
the device holds: its real-time data), `support` (a few labelled images, for FTA only), `query`
(labelled, evaluation) and `oracle` (plenty of labelled images, for the oracle upper bound).
All of a window's roles are drawn from that window's shift.
"""
import pickle
from typing import Mapping

import numpy as np

from mmpg_jax.data import digit_video, digits
from mmpg_jax.data import moving_digits as md

# Bump when the generator's output changes: it is part of the prepared data's cache key.
GENERATOR_VERSION = 2            # 2: each evaluation split has its own digit pool
NUM_CLASSES = 10
SPLIT_CODES = md.SPLIT_CODES
ROLE_CODES = md.ROLE_CODES
DRIFT_CODE = 50          # RNG stream of a device's drift trajectory
WINDOW_OFFSET = 1000     # + window: RNG stream of a window's images (per role)


def _reflect(x: float, lo: float, hi: float) -> float:
  """x folded back into [lo, hi] (a random walk that bounces off the range's ends)."""
  if hi <= lo:
    return lo
  span = hi - lo
  y = (x - lo) % (2 * span)
  return lo + (y if y <= span else 2 * span - y)


def _walk(rng, x: float, step: float, r) -> float:
  """One Gaussian step of size `step`, reflected inside the interval of range `r` (a range or
  a union of intervals, md.intervals) that holds x: a walk never leaves the interval it
  started in, so it never crosses into values its split must not show."""
  iv = md.intervals(r)
  lo, hi = min(iv, key=lambda i: 0.0 if i[0] <= x <= i[1] else min(abs(x - i[0]),
                                                                   abs(x - i[1])))
  return _reflect(x + rng.normal(0.0, step) if step > 0 else x, lo, hi)


def new_shift(rng: np.random.Generator, ranges: Mapping, size: int,
              pool_images: np.ndarray) -> dict:
  """A fresh draw from the split's ranges (md.sample_shift), with the clutter's fragments
  (`clutter`, unscaled) and strength (`clutter_strength`) kept apart so the strength can walk."""
  unit = dict(ranges, clutter_alpha=(1.0, 1.0))
  s = md.sample_shift(rng, unit, size, pool_images)
  s["clutter"] = s.pop("background")
  s["clutter_strength"] = np.float32(md.uniform(rng, ranges["clutter_alpha"]))
  # The prior's unnormalised gammas (p * Gamma(sum alpha) are independent Gamma(alpha_i)): the
  # state of its stationary drift (drift_step).
  alpha = float(ranges["label_concentration"])
  s["label_gamma"] = (s["label_prior"] * rng.gamma(alpha * NUM_CLASSES)).astype(np.float64)
  return s


def drift_step(rng: np.random.Generator, shift: Mapping, ranges: Mapping, drift: Mapping,
               size: int, pool_images: np.ndarray) -> tuple:
  """(the next window's shift, whether it jumped) from this window's (module docstring)."""
  if rng.random() < drift["jump_prob"]:
    return new_shift(rng, ranges, size, pool_images), True
  out = dict(shift)
  # A stationary Dirichlet(alpha) process (beta-gamma algebra: Beta(a(1-r), ar) * Gamma(a) +
  # Gamma(ar) ~ Gamma(a)): every window's prior is Dirichlet(alpha)-distributed, as concentrated
  # as the first, and consecutive windows' gammas correlate with 1 - r.
  alpha, rho = float(ranges["label_concentration"]), float(drift["label_rate"])
  if rho > 0:
    keep = rng.beta(alpha * (1 - rho), alpha * rho, NUM_CLASSES) if rho < 1 else 0.0
    gamma = keep * shift["label_gamma"] + rng.gamma(alpha * rho, 1.0, NUM_CLASSES)
    out["label_gamma"] = gamma
    out["label_prior"] = (gamma / max(gamma.sum(), 1e-300)).astype(np.float32)
  sign = 1.0 if shift["rotation"] >= 0 else -1.0
  out["rotation"] = np.float32(sign * _walk(rng, abs(float(shift["rotation"])),
                                            drift["rotation_step"], ranges["rotation"]))
  for key, rkey in (("noise", "noise"), ("blur", "blur"), ("clutter_strength", "clutter_alpha")):
    out[key] = np.float32(_walk(rng, float(shift[key]), drift[f"{key}_step"], ranges[rkey]))
  if rng.random() < drift["thickness_prob"]:
    allowed = sorted(int(t) for t in ranges["thickness"])
    i = allowed.index(int(shift["thickness"])) + int(rng.choice([-1, 1]))
    out["thickness"] = np.int32(allowed[min(max(i, 0), len(allowed) - 1)])
  return out, False


SHIFT_KEYS = ("rotation", "thickness", "invert", "noise", "blur", "clutter_strength",
              "label_prior", "jumped")


def _draw_trajectory(cfg: Mapping, split: str, index: int, images: np.ndarray,
                     by_class) -> list:
  """A stream's shifts drawn afresh (trajectory's work), frozen for sharing."""
  ranges = md.split_ranges(cfg, split)
  pool_images = images[np.concatenate(by_class)]
  size = int(cfg["size"])
  rng = np.random.default_rng([int(cfg["seed"]), SPLIT_CODES[split], int(index), DRIFT_CODE])
  out = [dict(new_shift(rng, ranges, size, pool_images), jumped=np.bool_(False))]
  for _ in range(int(cfg["drift"]["windows"]) - 1):
    nxt, jumped = drift_step(rng, out[-1], ranges, cfg["drift"], size, pool_images)
    out.append(dict(nxt, jumped=np.bool_(jumped)))
  for shift in out:
    for v in shift.values():
      if isinstance(v, np.ndarray):
        v.flags.writeable = False
  return out


# The stream last drawn: (config pickle, split, index), the digit images, its shifts.
_last_trajectory = (None, None, None)


def trajectory(cfg: Mapping, split: str, index: int) -> list:
  """The shifts of a device's windows 0..W-1 (the first drawn from the split's ranges, each
  next one a drift step from the last). `jumped` marks a window whose shift was redrawn.
  The stream last asked for is remembered (meta_window asks for each of its W windows in
  turn); its arrays are read-only."""
  global _last_trajectory
  images, by_class = _pool(cfg, split)
  try:
    key = (pickle.dumps(cfg), split, int(index))
  except (pickle.PicklingError, TypeError, AttributeError):   # not picklable: never remembered
    key = None
  last_key, last_images, shifts = _last_trajectory
  if key is None or last_key != key or last_images is not images:
    shifts = _draw_trajectory(cfg, split, index, images, by_class)
    _last_trajectory = (key, images, shifts)
  return [dict(s) for s in shifts]


def render_images(rng: np.random.Generator, shift: Mapping, pool_by_class, images: np.ndarray,
                  n: int, cfg: Mapping) -> dict:
  """n images of one window: {'image' [n, S, S] uint8, 'label' [n] int32}. A digit's 20x20
  box sits in an SxS canvas at a random offset (±cfg.jitter px around the centre)."""
  size, crop = int(cfg["size"]), digits.CROP
  label = rng.choice(NUM_CLASSES, size=n, p=shift["label_prior"] / shift["label_prior"].sum())
  imgs = digit_video.glyphs(rng, shift, pool_by_class, images, label, cfg["rotation_jitter"])
  centre = (size - crop) // 2
  j = int(cfg["jitter"])
  off = centre + rng.integers(-j, j + 1, size=(n, 2))
  background = shift["clutter_strength"] * shift["clutter"]
  canvas = np.broadcast_to(background, (n, size, size)).astype(np.float32)
  canvas = digit_video.paste(canvas, imgs, off)
  return {"image": digit_video.degrade(rng, canvas, shift), "label": label.astype(np.int32)}


_pool = md._pool        # (images, the split's instance pool by class)


def _rng(cfg, split, index, role, window):
  return np.random.default_rng([int(cfg["seed"]), SPLIT_CODES[split], int(index),
                                ROLE_CODES[role], WINDOW_OFFSET + int(window)])


# The role sizes of one window (the video benchmark's roles, per window).
device_roles = md.device_roles


def _shift_record(shift) -> dict:
  return {k: np.asarray(shift[k]) for k in SHIFT_KEYS}


def make_device(cfg: Mapping, split: str, index: int, roles: Mapping[str, int],
                windows=None, labelled_context: bool = False) -> dict:
  """One device's stream: {'device_id', 'shift': {key: [W, ...]}, role: {'image' [W, n, S,
  S], 'label' [W, n]}} for the windows `windows` (default all). `context` carries no labels
  unless `labelled_context` (the cloud's view of a meta device, for meta-training only)."""
  if split not in SPLIT_CODES or split == "global_train":
    raise ValueError(f"unknown device split {split!r}; expected one of "
                     f"{sorted(set(SPLIT_CODES) - {'global_train'})}")
  images, by_class = _pool(cfg, split)
  traj = trajectory(cfg, split, index)
  ws = range(len(traj)) if windows is None else windows
  out = {"device_id": np.int32(index),
         "shift": {k: np.stack([_shift_record(traj[w])[k] for w in ws]) for k in SHIFT_KEYS}}
  for role, n in roles.items():
    per = [render_images(_rng(cfg, split, index, role, w), traj[w], by_class, images, int(n),
                         cfg) for w in ws]
    out[role] = {"image": np.stack([p["image"] for p in per])}
    if role != "context" or labelled_context:
      out[role]["label"] = np.stack([p["label"] for p in per])
  return out


def meta_window(cfg: Mapping, index: int, roles: Mapping[str, int]) -> dict:
  """Meta device `index` (the cloud's fully labelled view): window index % W of the meta
  split's stream index // W, so meta-training sees windows at every stage of a drift."""
  w = int(cfg["drift"]["windows"])
  dev = make_device(cfg, "meta", index // w, roles, windows=[index % w], labelled_context=True)
  return {"device_id": np.int32(index), **{r: {k: v[0] for k, v in dev[r].items()}
                                           for r in roles}}


def make_global_train_device(cfg: Mapping, index: int, n: int) -> dict:
  """The cloud's pooled training images of one global-train device (one stationary shift)."""
  images, by_class = _pool(cfg, "global_train")
  rng = np.random.default_rng([int(cfg["seed"]), SPLIT_CODES["global_train"], int(index)])
  shift = new_shift(rng, cfg["shift"], int(cfg["size"]), images[np.concatenate(by_class)])
  return render_images(np.random.default_rng([int(cfg["seed"]), SPLIT_CODES["global_train"],
                                              int(index), ROLE_CODES["train"]]),
                       shift, by_class, images, n, cfg)
