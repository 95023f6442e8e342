"""Config values checked before any work starts: each error names the key and what to do.

(Unknown keys are refused earlier, by `lock_config=True` on the --config flag.)
"""
import math

import numpy as np

from mmpg_jax.adapt import adr


class ConfigError(ValueError):
  """A config value is invalid."""


def need(ok, key, value, why):
  """Raises ConfigError naming config.<key>=value unless ok."""
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


def _positive(cfg, key):
  node = cfg
  for part in key.split("."):
    node = node[part]
  values = node if isinstance(node, (tuple, list)) else (node,)
  for v in values:
    need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, key, node,
          "must be a positive number (every entry, for a grid)")


def validate(cfg, task=None, num_elements=None, dynamic_shapes=None) -> None:
  """Raises ConfigError for the first invalid value. `task`: its data name and its own checks
  (`task.validate_config`); `num_elements`: {modality: anchor elements of a device's context},
  to check the anchor budgets; `dynamic_shapes`: {path: shape} of the edited leaves, to check
  the FDA rank against the layers."""
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
  d = cfg.data
  if task is not None:
    need(d.get("name") in task.datasets, "data.name", d.get("name"),
          f"task {task.name!r} reads {task.datasets}; this config's data is another task's. Use "
          f"a config made for {task.name!r} (configs/) or set config.task to the task the data "
          f"belongs to")
    task.validate_config(cfg)
  need(all(k <= d.support_size for k in cfg.baselines.fta.ks), "baselines.fta.ks",
        cfg.baselines.fta.ks, f"FTA with k labels needs k <= data.support_size={d.support_size}")
  a = cfg.adr
  if num_elements:
    n_el = min(num_elements.values())
    where = ", ".join(f"{m}: {n}" for m, n in num_elements.items())
    for key, k in [("adr.k", a.k)] + [("adr.k_sweep", k) for k in a.k_sweep]:
      need(1 <= k <= n_el, key, k, f"K must be between 1 and the {n_el} anchor elements of a "
            f"device's context ({where}; data.context_size={d.context_size})")
    for k in cfg.fda.train_ks:
      need(0 <= k <= n_el, "fda.train_ks", cfg.fda.train_ks,
            f"each K in 0..{n_el} (0 = all anchor elements; {where})")
  for sel in (a.selector,) + tuple(a.ablations):
    need(sel in adr.SELECTORS, "adr.selector/ablations", sel, f"known: {adr.SELECTORS}")
  need(cfg.comm_dtype in ("float32", "float16", "bfloat16"), "comm_dtype", cfg.comm_dtype,
        "use float32, float16 or bfloat16")
  if dynamic_shapes:
    for path, shape in dynamic_shapes.items():
      if len(shape) >= 2 and int(np.prod(shape)) > cfg.fda.full_delta_max:
        rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
        need(cfg.fda.rank <= min(rows, cols), "fda.rank", cfg.fda.rank,
              f"larger than layer {path} ({rows} x {cols}); a rank-r edit of it needs "
              f"r <= {min(rows, cols)}")
