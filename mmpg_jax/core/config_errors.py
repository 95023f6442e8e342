"""Config errors: the one exception every config check raises, and its two helpers.

A leaf module (it imports nothing of the package), so that data builders, tasks, method
families and the run-level checks can all raise the same error without importing each other.
Unknown keys are refused earlier, by `lock_config=True` on the --config flag.
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
