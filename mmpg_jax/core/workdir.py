"""The self-describing workdir: a writability check, config.json, metrics.jsonl, a quiet log."""
import json
import os
import time

from absl import logging


class WorkdirError(OSError):
  """The workdir cannot be used."""


def prepare(workdir: str) -> str:
  """Creates the workdir and proves it is writable before any work is done."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
        f"workdir {workdir!r} is not a writable directory ({e.strerror or e}). Pass a --workdir "
        f"that you can write to; nothing was started.") from e
  return workdir


def write_json(path: str, obj, sort_keys: bool = True) -> None:
  """Writes atomically (temp file + rename), so a crash never leaves half a file."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=sort_keys)
      f.write("\n")
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise WorkdirError(e.errno, _cannot_write(path, e)) from e


def _cannot_write(path, e):
  return (f"could not write {path} ({e.strerror or e}); its previous version is untouched. "
          f"Free disk space or fix permissions and rerun the same command: finished stages "
          f"resume from their checkpoints.")


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, stage: str, step: int, **metrics):
    row = {"stage": stage, "step": int(step), "time": time.time(),
           **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise WorkdirError(e.errno, _cannot_write(self.path, e)) from e


class _QuietLibraries:
  """Drops orbax's and TFDS's per-save INFO chatter from the absl log; warnings still show."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/")
    if "Using custom data configuration" in str(record.msg):
      return False
    return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def quiet_library_logs():
  logging.get_absl_handler().addFilter(_QuietLibraries())
