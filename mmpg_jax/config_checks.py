"""Config values checked before any work starts: each error names the key and what to do.

(Unknown keys are refused earlier, by `lock_config=True` on the --config flag.)
"""
import math

import numpy as np

from mmpg_jax.adapt import adr


class ConfigError(ValueError):
  """A config value is invalid."""


def _need(ok, key, value, why):
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


def _positive(cfg, key):
  node = cfg
  for part in key.split("."):
    node = node[part]
  values = node if isinstance(node, (tuple, list)) else (node,)
  for v in values:
    _need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, key, node,
          "must be a positive number (every entry, for a grid)")


def validate(cfg, dynamic_shapes=None) -> None:
  """Raises ConfigError for the first invalid value. `dynamic_shapes`: {path: shape} of the
  edited leaves, to check the FDA rank against the layers."""
  d = cfg.data
  for key in ("train.learning_rate", "train.num_steps", "train.batch_size",
              "train.checkpoint_every", "train.log_every", "fda.learning_rate",
              "fda.num_steps", "fda.devices_per_step", "fda.meta_devices", "fda.rank",
              "fda.clip", "fda.checkpoint_every", "fda.eval_every", "fda.log_every",
              "baselines.fta.learning_rates", "baselines.fta.steps",
              "baselines.tent.learning_rates", "baselines.tent.steps",
              "baselines.oracle.learning_rates", "baselines.oracle.steps",
              "baselines.prior_em.iterations", "data.context_size", "data.query_size",
              "data.num_val_devices", "data.num_test_devices", "data.num_global_devices",
              "eval.device_chunk"):
    _positive(cfg, key)
  _need(d.frames >= 2, "data.frames", d.frames, "need at least 2 frames: anchors carry the "
        "temporal difference between consecutive frames, and motion needs 2 frames")
  room = d.size - 20
  _need(d.speed * (d.frames - 1) <= room, "data.speed", d.speed,
        f"a digit moving {d.speed} px/frame for {d.frames - 1} steps leaves a {d.size}px frame "
        f"(room {room}px); lower data.speed or data.frames, or raise data.size")
  _need(all(k <= d.support_size for k in cfg.baselines.fta.ks), "baselines.fta.ks",
        cfg.baselines.fta.ks, f"FTA with k labels needs k <= data.support_size={d.support_size}")
  n_el = d.context_size * (d.frames - 1)
  a = cfg.adr
  for key, k in [("adr.k", a.k)] + [("adr.k_sweep", k) for k in a.k_sweep]:
    _need(1 <= k <= n_el, key, k, f"K must be between 1 and the {n_el} frame elements of a "
          f"context (data.context_size x (data.frames - 1)) = {d.context_size} x {d.frames - 1}")
  for sel in (a.selector,) + tuple(a.ablations):
    _need(sel in adr.SELECTORS, "adr.selector/ablations", sel, f"known: {adr.SELECTORS}")
  for k in cfg.fda.train_ks:
    _need(0 <= k <= n_el, "fda.train_ks", cfg.fda.train_ks,
          f"each K in 0..{n_el} (0 = all frame elements)")
  _need(cfg.comm_dtype in ("float32", "float16", "bfloat16"), "comm_dtype", cfg.comm_dtype,
        "use float32, float16 or bfloat16")
  if dynamic_shapes:
    for path, shape in dynamic_shapes.items():
      if len(shape) >= 2 and int(np.prod(shape)) > cfg.fda.full_delta_max:
        rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
        _need(cfg.fda.rank <= min(rows, cols), "fda.rank", cfg.fda.rank,
              f"larger than layer {path} ({rows} x {cols}); a rank-r edit of it needs "
              f"r <= {min(rows, cols)}")
