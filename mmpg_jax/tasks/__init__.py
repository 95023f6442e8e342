"""Tasks, chosen by `config.task` (as big_vision loads models and evaluators by name).

`build(config)` returns the task object. A name is looked up in the registry below, or, when it
contains a dot, imported as a module path whose `Task` attribute is the task class (a task kept
outside this package needs no registry entry). Adding a task: one module here, a config, and a
line in `_REGISTRY`.
"""
import importlib

from mmpg_jax.tasks.base import Metric, Task  # noqa: F401  (the interface)

_REGISTRY = {
    "video_qa": "mmpg_jax.tasks.video_qa",
    "video_retrieval": "mmpg_jax.tasks.video_retrieval",
    "image_classification": "mmpg_jax.tasks.image_classification",
    "seqrec": "mmpg_jax.tasks.seqrec",
}
_EXTRA = {}


class UnknownTaskError(ValueError):
  """config.task names no task."""


def register(name: str, task_cls) -> None:
  """Registers a task class under `name` (e.g. a task defined in a test)."""
  _EXTRA[name] = task_cls


def known() -> tuple:
  return tuple(sorted(set(_REGISTRY) | set(_EXTRA)))


def get(name: str):
  if name in _EXTRA:
    return _EXTRA[name]
  path = _REGISTRY.get(name) or (name if "." in name else None)
  if path is None:
    raise UnknownTaskError(f"config.task={name!r} is not a known task; known tasks: "
                           f"{', '.join(known())} (or a module path whose `Task` class is "
                           f"the task)")
  try:
    module = importlib.import_module(path)
  except ModuleNotFoundError as e:
    raise UnknownTaskError(f"config.task={name!r}: cannot import {path} ({e}); known tasks: "
                           f"{', '.join(known())}") from e
  return module.Task


def build(config):
  return get(config.task)(config)
