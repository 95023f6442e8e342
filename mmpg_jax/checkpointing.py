"""Orbax checkpoints of one training stage, with automatic resume and a shape check.

Each stage (the global model, later the FDA) keeps its own CheckpointManager under
`WORKDIR/checkpoints/<stage>`. Items: `state` (params, optimiser state, step; StandardSave)
and `meta` (JSON). A restore always passes a target built from a fresh init, so optax state
types survive, and compares the stored shapes with it first, so a workdir written with a
different config is refused with a message instead of a shape error deep inside orbax.
"""
import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir does not fit the current config's shapes."""


def _shape_tree(tree):
  return {k: tuple(v.shape) for k, v in _flat(tree).items()}


def _key_name(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree):
  """{'opt_state/0/mu/...': leaf}: names that agree between a live tree (namedtuples) and
  orbax's stored metadata (plain dicts and lists)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in p): v for p, v in leaves}


class StageCheckpointer:

  def __init__(self, workdir: str, stage: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", stage))
    self.stage = stage
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=opts,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def latest_step(self):
    return self._mngr.latest_step()

  def restore(self, target, step=None):
    """Restores (state, meta) at `step` (default latest) into the structure of `target`."""
    step = self.latest_step() if step is None else step
    stored = self._mngr.item_metadata(step)["state"]
    want, have = _shape_tree(target), _shape_tree(dict(stored) if stored is not None else {})
    if want != have:
      diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
      lines = [f"  {k}: checkpoint {have.get(k, 'missing')} vs config {want.get(k, 'missing')}"
               for k in diff[:12]]
      raise CheckpointMismatchError(
          f"the {self.stage} checkpoint at {self.directory} (step {step}) was written by a "
          f"config with different shapes:\n" + "\n".join(lines) +
          f"\nUse a fresh --workdir for this config, or rerun with the config the workdir was "
          f"made with (its config.json).")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    r = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return r["state"], r["meta"]

  def resume(self, state, total_steps: int):
    """(state, start step): the latest checkpoint restored into `state`'s structure, or
    (`state`, 0) when the stage has none yet."""
    if self.latest_step() is None:
      return state, 0
    state, _ = self.restore(state)
    start = int(state["step"])
    logging.info("%s: resuming from checkpoint step %d of %d (%s)", self.stage, start,
                 total_steps, self.directory)
    return state, start

  def save(self, step: int, state, meta: dict):
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
