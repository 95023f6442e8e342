"""Config values checked before any work starts: each error names the key and what to do.

(Unknown keys are refused earlier, by `lock_config=True` on the --config flag.)
"""
import importlib

import jax

from mmpg_jax import tasks
from mmpg_jax.core import codec
from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import ConfigError, need, positive
from mmpg_jax.ondevice import device
from mmpg_jax.training import train


def validate(cfg, task=None) -> None:
  """Raises ConfigError for the first invalid generic value (training, baselines, protocol);
  `task`: its data name and its own checks (`task.validate_config`). A method family checks
  its own block (e.g. `cdc_mmpg.validate_config`), called by `config_checks.check`."""
  for key in ("train.learning_rate", "train.num_steps", "train.batch_size",
              "train.checkpoint_every", "train.log_every",
              "baselines.fta.learning_rates", "baselines.fta.steps",
              "baselines.tent.learning_rates", "baselines.tent.steps",
              "baselines.oracle.learning_rates", "baselines.oracle.steps",
              "baselines.prior_em.iterations", "data.context_size", "data.query_size",
              "data.num_val_devices", "data.num_test_devices", "data.num_global_devices",
              "eval.device_chunk"):
    positive(cfg, key)
  tc = cfg.train
  need(tc.get("schedule", "cosine") in train.SCHEDULES, "train.schedule",
       tc.get("schedule"), "'cosine' (decay to 0) or 'constant' (held after warmup)")
  need(isinstance(tc.get("eval_every", 0), int) and tc.get("eval_every", 0) >= 0,
       "train.eval_every", tc.get("eval_every"),
       "an integer >= 0 (steps between validation scores; 0 keeps the last step's model)")
  d = cfg.data
  if task is not None:
    need(d.get("name") in task.datasets, "data.name", d.get("name"),
         f"task {task.name!r} reads {task.datasets}; this config's data is another task's. Use "
         f"a config made for {task.name!r} (configs/) or set config.task to the task the data "
         f"belongs to")
    task.validate_config(cfg)
  need(all(k <= d.support_size for k in cfg.baselines.fta.ks), "baselines.fta.ks",
       cfg.baselines.fta.ks, f"FTA with k labels needs k <= data.support_size={d.support_size}")
  need(cfg.comm_dtype in ("float32", "float16", "bfloat16"), "comm_dtype", cfg.comm_dtype,
       "use float32, float16 or bfloat16")
  rc = cfg.get("report")
  need(rc is not None and len(rc.get("references", ())) > 0
       and all(isinstance(r, str) for r in rc.references), "report.references",
       None if rc is None else rc.get("references"),
       "a tuple of row names (or 'best_rival') every method is compared against; see "
       "configs/common.py report()")
  need(all(isinstance(r, str) for r in rc.get("ood_rows", ())), "report.ood_rows",
       rc.get("ood_rows"), "a tuple of row names (may be empty)")
  if "deploy" in cfg:
    dc = cfg.deploy
    need(all(e in codec.ENCODINGS for e in dc.encodings)
         and (not dc.encodings or "float32" in dc.encodings), "deploy.encodings", dc.encodings,
         f"encodings from {codec.ENCODINGS}, float32 among them (the reference), or ()")
    need(dc.codec_tolerance >= 0, "deploy.codec_tolerance", dc.codec_tolerance, "a value >= 0")
    need(all(0 < b <= 1 for b in dc.budgets), "deploy.budgets", dc.budgets,
         "request shares in (0, 1]")
    need(all(0 <= b <= 1 for b in dc.curve), "deploy.curve", dc.curve, "shares in [0, 1]")
    need(dc.windows_per_hour > 0, "deploy.windows_per_hour", dc.windows_per_hour, "a value > 0")


def method_family(name: str):
  """A method family: `mmpg_jax.adapt.<name>`, or else the importable module `name` (a
  family kept outside the package), with `build(ctx)`."""
  paths = (name,) if "." in name else (f"mmpg_jax.adapt.{name}", name)
  for path in paths:
    try:
      return importlib.import_module(path)
    except ModuleNotFoundError as e:
      if e.name is None or not path.startswith(e.name):
        raise                        # the family exists but an import inside it failed
      error = e
  raise ConfigError(
      f"config.method_families names {name!r}, but {' or '.join(paths)} cannot be imported "
      f"({error}); families are modules under mmpg_jax/adapt/ (or importable modules) with a "
      f"build(ctx) function") from error


def check(config):
  """Every check that needs no data: task, config values, leaf regexes, each method family's
  own block (its optional `validate_config`). Returns (task, model, family modules)."""
  task = tasks.build(config)
  validate(config, task)
  families = [method_family(f) for f in config.method_families]
  model = task.build_model()
  abstract = jax.eval_shape(lambda: task.init_params(model, config.seed))
  P.select(abstract, config.dynamic_leaves)
  device.cached_features_valid(abstract, config.dynamic_leaves, task.encoder_prefixes)
  for family in families:
    if hasattr(family, "validate_config"):
      family.validate_config(config, task, model, abstract)
  return task, model, families
