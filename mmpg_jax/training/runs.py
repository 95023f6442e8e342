"""A finished run, read back: the one owner of "load a run's workdir".

`restore_base(config, workdir)` checks that the workdir was written by this config (key for
key, `RunMismatchError` otherwise) and that the global model's stage has finished
(`RunNotFinishedError`, saying what to run), then restores the task, the device model and its
parameters. It knows no method family: a family restores its own stages on top of this (the
FDA's: `fda.stage.restore`). `generate`, `bench` and any later tool that reads a run go through
here, never through the stages' own internals.
"""
import json
import os

from mmpg_jax.core import checkpointing
from mmpg_jax.training import config_checks, train


class RunMismatchError(ValueError):
  """The workdir was written by another config (or is not a run's workdir)."""


# The workdir's run has not finished a stage the reader needs.
RunNotFinishedError = checkpointing.StageNotFinishedError


def _flat_config(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_run_config(config, workdir: str) -> None:
  """The workdir's config.json must be this config, key for key."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunMismatchError(f"{workdir} has no config.json, so it is not the workdir of a run of "
                           f"`python -m mmpg_jax.main`; pass --workdir=<a finished run's "
                           f"workdir>.")
  with open(path) as f:
    have = _flat_config(json.load(f))
  want = _flat_config(json.loads(config.to_json_best_effort()))
  diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
  if diff:
    shown = "; ".join(f"{k}: run {have.get(k, 'missing')!r} vs now {want.get(k, 'missing')!r}"
                      for k in diff[:6])
    raise RunMismatchError(
        f"{workdir} was written by a different config ({len(diff)} keys differ: {shown}). Its "
        f"hypernetwork belongs to that config: pass the config and overrides the run was made "
        f"with (its config.json), or another --workdir.")


def restore_base(config, workdir: str):
  """(task, model, global model params) of a run whose global stage has finished."""
  workdir = os.path.abspath(workdir)
  check_run_config(config, workdir)
  task, model, _ = config_checks.check(config)
  _, target = train.initial_state(task, model, config)
  params = train.final_params(checkpointing.restore_finished(
      workdir, train.STAGE, target, config.train.num_steps), config)
  return task, model, params
