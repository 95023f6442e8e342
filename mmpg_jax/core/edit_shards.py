"""The on-disk format of generated edits: numpy shards with a JSON index.

    OUT/index.json                    what the shards hold (below); written first
    OUT/edits-00000-of-00245.npy      float array [rows, D]: row r = device shard*S + r
    OUT/metrics-00000-of-00245.json   (--evaluate) per-shard sums instead of edits
    OUT/done.json                     totals, written once every shard is there

One row is one device's whole edit, flattened leaf by leaf in the edit pytree's order;
`index.json["leaves"]` gives each leaf's path, shape and offset in the row (`unflatten` turns a
row back into the edit pytree, `read` loads rows by device id). Shards cover fixed ranges of
`devices_per_shard` devices (the last one shorter), so shard k of a run is always the same
devices, whichever host wrote it and whether or not the run was interrupted. A shard is written
to a temporary name and renamed, so a file under its final name is complete: a rerun skips it.
The .npy bytes are a function of the array alone (no timestamps), so an interrupted and resumed
run ends with the same bytes as an uninterrupted one. Files go through etils.epath (as TFDS's
do); on Cloud TPU, write into a gcsfuse mount of the bucket (WORKSPACE.md, "Cloud TPU").
"""
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

FORMAT = "mmpg_jax.edit_shards/1"


class OutputMismatchError(ValueError):
  """The output directory holds a different run's shards."""


def leaf_table(edit_shape) -> list:
  """[{'path', 'shape', 'offset'}] of an edit pytree (of arrays or ShapeDtypeStructs)."""
  table, offset = [], 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(edit_shape)[0]:
    size = int(np.prod(leaf.shape))
    table.append({"path": jax.tree_util.keystr(path), "shape": list(leaf.shape),
                  "offset": offset})
    offset += size
  return table


def flatten(edit, dtype=jnp.float32):
  """One device's edit -> a flat row [D] (leaves in tree order)."""
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jax.tree.leaves(edit)])


def unflatten(row, like):
  """A flat row -> the edit pytree shaped like `like` (an edit or its eval_shape)."""
  leaves, treedef = jax.tree.flatten(like)
  out, offset = [], 0
  for leaf in leaves:
    size = int(np.prod(leaf.shape))
    out.append(np.asarray(row[offset:offset + size], np.float32).reshape(leaf.shape))
    offset += size
  return jax.tree.unflatten(treedef, out)


def num_shards(num_devices: int, per_shard: int) -> int:
  return -(-num_devices // per_shard)


def shard_range(k: int, per_shard: int, num_devices: int) -> range:
  return range(k * per_shard, min(num_devices, (k + 1) * per_shard))


def shard_path(out, kind: str, k: int, total: int):
  return epath.Path(out) / f"{kind}-{k:05d}-of-{total:05d}.{'npy' if kind == 'edits' else 'json'}"


def _atomic_write(path, data: bytes):
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)                            # overwrites a truncated copy


def npy_bytes(array) -> bytes:
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
  return buf.getvalue()


def write_shard(path, array):
  _atomic_write(path, npy_bytes(array))


def write_json(path, obj):
  _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@functools.lru_cache(maxsize=8)
def shard_bytes(rows: int, row_floats: int, dtype: str) -> int:
  """The size of a complete shard: the .npy header np.save writes, plus the data."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {
      "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
      "shape": (rows, row_floats)})
  return len(buf.getvalue()) + rows * row_floats * np.dtype(dtype).itemsize


def shard_complete(path, rows: int, row_floats: int, dtype) -> bool:
  """A shard under its final name, of the expected size (a truncated copy is redone)."""
  path = epath.Path(path)
  return path.exists() and path.stat().length == shard_bytes(rows, row_floats,
                                                             np.dtype(dtype).name)


def open_output(out, index: dict) -> None:
  """Creates OUT with `index` as its index.json, or checks that OUT's index is the same run;
  a different run's directory is refused and left untouched."""
  out = epath.Path(out)
  path = out / "index.json"
  if path.exists():
    have = json.loads(path.read_text())
    diff = sorted(k for k in set(have) | set(index) if have.get(k) != index.get(k))
    if diff:
      raise OutputMismatchError(
          f"{out} already holds the shards of a different run (index.json differs in "
          f"{diff}: there {[have.get(k) for k in diff[:3]]}, now "
          f"{[index.get(k) for k in diff[:3]]}). Nothing was overwritten: pass a fresh --out, "
          f"or rerun with the flags that run was made with to resume it.")
    return
  if out.exists() and any(out.iterdir()):
    raise OutputMismatchError(f"{out} is not empty and has no index.json: it is not a "
                              f"generation output. Nothing was overwritten; pass a fresh --out.")
  out.mkdir(parents=True, exist_ok=True)
  write_json(path, index)


def read(out, device_ids) -> np.ndarray:
  """The flat edit rows [len(device_ids), D] of the given devices (unflatten each row)."""
  out = epath.Path(out)
  index = json.loads((out / "index.json").read_text())
  per, n = index["devices_per_shard"], index["num_devices"]
  total = num_shards(n, per)
  cache, rows = {}, []
  for d in device_ids:
    if not 0 <= d < n:
      raise IndexError(f"device {d} is not in this run's 0..{n - 1}")
    k = d // per
    if k not in cache:
      with shard_path(out, "edits", k, total).open("rb") as f:
        cache[k] = np.load(f)
    rows.append(cache[k][d - k * per])
  return np.stack(rows)
