"""Config values checked before any work starts: each error names the key and what to do.

(Unknown keys are refused earlier, by `lock_config=True` on the --config flag.)
"""
import math



class ConfigError(ValueError):
  """A config value is invalid."""


def need(ok, key, value, why):
  """Raises ConfigError naming config.<key>=value unless ok."""
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


def positive(cfg, key):
  """Raises ConfigError unless every entry of config.<key> is a positive finite number."""
  node = cfg
  for part in key.split("."):
    node = node[part]
  values = node if isinstance(node, (tuple, list)) else (node,)
  for v in values:
    need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, key, node,
          "must be a positive number (every entry, for a grid)")


def validate(cfg, task=None) -> None:
  """Raises ConfigError for the first invalid generic value (training, baselines, protocol);
  `task`: its data name and its own checks (`task.validate_config`). A method family checks
  its own block (e.g. `cdc_mmpg.validate_config`), called by `main.check`."""
  for key in ("train.learning_rate", "train.num_steps", "train.batch_size",
              "train.checkpoint_every", "train.log_every",
              "baselines.fta.learning_rates", "baselines.fta.steps",
              "baselines.tent.learning_rates", "baselines.tent.steps",
              "baselines.oracle.learning_rates", "baselines.oracle.steps",
              "baselines.prior_em.iterations", "data.context_size", "data.query_size",
              "data.num_val_devices", "data.num_test_devices", "data.num_global_devices",
              "eval.device_chunk"):
    positive(cfg, key)
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
