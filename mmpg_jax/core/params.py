"""Parameter-pytree plumbing: leaf paths, regex selection, split/merge, edits.

Leaves are named by their '/'-joined path ("answer_head/out/kernel"). The config selects the
*dynamic* leaves (those an edit may change) with regexes; everything else is *static*. An
*edit* is a nested dict with the structure of the dynamic subtree whose leaves are either full
deltas (arrays of the leaf's shape) or `LowRankDelta(a, b)` factors, delta = (a @ b) reshaped.
"""
import re
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

PyTree = Any
SEP = "/"


def flatten(tree: Mapping) -> dict:
  """{'a/b/c': leaf} in a stable (sorted) order."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=SEP)
  return dict(sorted(flat.items()))


def unflatten(flat: Mapping) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def leaf_paths(tree: Mapping) -> list:
  return list(flatten(tree))


def select(tree: Mapping, patterns: Iterable[str]) -> list:
  """Paths of leaves matched (re.fullmatch) by any pattern. A pattern matching nothing is an
  error: a typo would otherwise silently freeze or unfreeze the wrong leaves."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  paths = leaf_paths(tree)
  chosen = set()
  for pat in patterns:
    try:
      rx = re.compile(pat)
    except re.error as e:
      raise ValueError(f"leaf regex {pat!r} is not a valid regular expression: {e}") from e
    hits = [p for p in paths if rx.fullmatch(p)]
    if not hits:
      raise ValueError(
          f"leaf regex {pat!r} matches no parameter leaf. Leaves are '/'-joined paths matched "
          f"in full; available leaves:\n  " + "\n  ".join(paths))
    chosen.update(hits)
  return [p for p in paths if p in chosen]


def split(params: Mapping, patterns: Iterable[str]):
  """(static, dynamic): two nested dicts partitioning the leaves of `params`."""
  dyn = set(select(params, patterns))
  flat = flatten(params)
  static = {p: v for p, v in flat.items() if p not in dyn}
  dynamic = {p: v for p, v in flat.items() if p in dyn}
  return unflatten(static), unflatten(dynamic)


def merge(static: Mapping, dynamic: Mapping) -> dict:
  """Inverse of `split`. Overlapping leaves are an error."""
  fs, fd = flatten(static), flatten(dynamic)
  both = set(fs) & set(fd)
  if both:
    raise ValueError(f"static and dynamic trees overlap at {sorted(both)}")
  return unflatten({**fs, **fd})


@flax.struct.dataclass
class LowRankDelta:
  """delta = (a @ b).reshape(shape): a [prod(shape[:-1]), r], b [r, shape[-1]]."""
  a: jax.Array
  b: jax.Array


def materialize(delta, shape) -> jax.Array:
  if isinstance(delta, LowRankDelta):
    return (delta.a @ delta.b).reshape(shape)
  return delta


def _is_delta(x):
  return isinstance(x, LowRankDelta)


def edit_leaves(edit: Mapping) -> dict:
  """{path: delta} with LowRankDelta kept whole."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(edit), sep=SEP,
                                    is_leaf=lambda _, x: _is_delta(x))
  return dict(sorted(flat.items()))


def apply_edit(params: Mapping, edit: Mapping, clip: float | None = None,
               mode: str = "add") -> dict:
  """params with `edit` applied to the leaves it names: mode "add" (a residual edit: CDC-MMPG,
  Persona) gives W + clip(delta, ±clip); mode "replace" (generated weights: DUET) gives
  clip(delta, ±clip), the leaf's value replaced outright.

  Leaves the edit does not name are returned untouched (the same arrays), so an empty or
  all-zero "add" edit reproduces the base model exactly.
  """
  if mode not in ("add", "replace"):
    raise ValueError(f"apply_edit mode must be 'add' or 'replace', not {mode!r}")
  flat = flatten(params)
  for path, delta in edit_leaves(edit).items():
    if path not in flat:
      raise KeyError(f"edit names leaf {path!r}, which the device model does not have")
    w = flat[path]
    d = materialize(delta, w.shape)
    if d.shape != w.shape:
      raise ValueError(f"edit for {path!r} has shape {d.shape}, leaf has {w.shape}")
    if clip is not None:
      d = jnp.clip(d, -clip, clip)
    flat[path] = (w + d.astype(w.dtype)) if mode == "add" else d.astype(w.dtype)
  return unflatten(flat)


def zeros_edit(dynamic: Mapping) -> dict:
  return jax.tree.map(jnp.zeros_like, dynamic)


def tree_bytes(tree: PyTree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def tree_size(tree: PyTree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
