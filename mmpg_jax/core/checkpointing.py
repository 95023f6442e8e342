"""Orbax checkpoints of one training stage: automatic resume, shape check, damage check.

Each stage (the global model, the FDA) keeps its own CheckpointManager under
`WORKDIR/checkpoints/<stage>`. Items: `state` (params, optimiser state, step; StandardSave)
and `meta` (JSON, with a SHA-256 of every array of the state). A restore always passes a
target built from a fresh init, so optax state types survive, and
  * compares the stored shapes with it first: a workdir written with a different config is
    refused with a message (`CheckpointMismatchError`), never restored into wrong shapes;
  * verifies the checksum: a truncated or corrupted latest checkpoint is reported and the
    previous good step is used; when no step is usable, `CheckpointCorruptError` says so and
    where.
"""
import hashlib
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir does not fit the current config's shapes."""


class CheckpointCorruptError(RuntimeError):
  """No checkpoint of the stage could be restored intact."""


class StageNotFinishedError(RuntimeError):
  """A stage that a reader needs finished has not reached its last step."""


def state_checksum(state) -> str:
  """SHA-256 over every leaf's dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


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


def steps_on_disk(directory: str) -> list:
  """The step numbers of a stage's checkpoint folder, without opening (or creating) it."""
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit()) \
      if os.path.isdir(directory) else []


class StageCheckpointer:

  def __init__(self, workdir: str, stage: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", stage))
    self.stage = stage
    self._keep = keep
    self._open()

  def _open(self):
    opts = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=opts,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def _quarantine(self, steps):
    """Moves damaged steps aside (kept for inspection, never deleted) so that training can
    write those steps again."""
    self._mngr.close()
    dest = self.directory + "_damaged"
    os.makedirs(dest, exist_ok=True)
    for s in steps:
      target = os.path.join(dest, f"step_{s}")
      n = 1
      while os.path.exists(target):
        target, n = os.path.join(dest, f"step_{s}.{n}"), n + 1
      shutil.move(os.path.join(self.directory, str(s)), target)
      logging.warning("moved damaged %s checkpoint step %d to %s", self.stage, s, target)
    self._open()

  def latest_step(self):
    return self._mngr.latest_step()

  def all_steps(self):
    return sorted(self._mngr.all_steps())

  def restore(self, target, step=None):
    """Restores (state, meta) into the structure of `target`: `step`, or the newest intact
    step, falling back past damaged ones (each reported)."""
    steps = [step] if step is not None else self.all_steps()[::-1]
    problems, damaged = [], []
    for s in steps:
      try:
        state, meta = self._restore_step(target, s)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        problems.append(f"step {s}: {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}")
        damaged.append(s)
        logging.warning("%s checkpoint step %d in %s is unreadable (%s); trying an earlier step",
                        self.stage, s, self.directory, problems[-1])
        continue
      want = meta.get("checksum")
      if want is not None and state_checksum(state) != want:
        problems.append(f"step {s}: checksum mismatch (the files were altered or truncated)")
        damaged.append(s)
        logging.warning("%s checkpoint step %d in %s fails its checksum; trying an earlier "
                        "step", self.stage, s, self.directory)
        continue
      if damaged:
        logging.warning("%s: using step %d, the newest intact checkpoint", self.stage, s)
        self._quarantine(damaged)
      return state, meta
    raise CheckpointCorruptError(
        f"no usable {self.stage} checkpoint in {self.directory}:\n  " + "\n  ".join(problems) +
        f"\nDelete {self.directory} to restart this stage from scratch (or restore the files "
        f"from a backup).")

  def _restore_step(self, target, step):
    stored = self._mngr.item_metadata(step)["state"]
    want, have = _shape_tree(target), _shape_tree(dict(stored) if stored is not None else {})
    if want != have:
      diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
      lines = [f"  {k}: checkpoint {have.get(k, 'missing')} vs config {want.get(k, 'missing')}"
               for k in diff[:12]]
      raise CheckpointMismatchError(
          f"the {self.stage} checkpoint at {self.directory} (step {step}) was written by a "
          "config with different shapes:\n" + "\n".join(lines) +
          "\nUse a fresh --workdir for this config, or rerun with the config the workdir was "
          "made with (its config.json).")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    r = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return r["state"], r["meta"]

  def resume(self, state, total_steps: int):
    """(state, start step): the newest intact checkpoint restored into `state`'s structure,
    or (`state`, 0) when the stage has none yet."""
    if not self.all_steps():
      return state, 0
    state, _ = self.restore(state)
    start = int(state["step"])
    logging.info("%s: resuming from checkpoint step %d of %d (%s)", self.stage, start,
                 total_steps, self.directory)
    return state, start

  def save(self, step: int, state, meta: dict):
    meta = dict(meta, checksum=state_checksum(state))
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      self._mngr.wait_until_finished()   # a save is complete (or failed) before training goes on
    except OSError as e:
      raise OSError(e.errno, f"could not write the {self.stage} checkpoint of step {step} to "
                    f"{self.directory} ({e.strerror or e}); earlier checkpoints are untouched. "
                    f"Free disk space and rerun the same command to resume.") from e

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def restore_finished(workdir: str, stage: str, target, num_steps: int):
  """The state of a stage that has reached `num_steps` (its last checkpoint), restored into
  `target`; StageNotFinishedError says what to run when it has not."""
  directory = os.path.join(workdir, "checkpoints", stage)
  steps = steps_on_disk(directory)
  if not steps or steps[-1] < num_steps:
    raise StageNotFinishedError(
        f"the run in {workdir} has not finished its '{stage}' stage (checkpoint steps "
        f"{steps or 'none'} of {num_steps}); finish it first with `python -m mmpg_jax.main` and "
        f"the same --config and --workdir (it resumes).")
  with StageCheckpointer(workdir, stage) as ck:
    state, _ = ck.restore(target, step=steps[-1])
  return state
