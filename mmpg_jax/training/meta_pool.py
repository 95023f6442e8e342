"""Encoded meta-device pools: each rendered and encoded once per run, kept in the workdir.

Several stages of one run read the same meta devices: global_meta's queries, each FDA's
episodes (`fda`, and `fda_on_global_meta` on another base), the FDA's reference set (the first
`fda.reference_devices` of them), the cdc_robust router, Persona's editors. Rendering and
encoding them is minutes on a CPU, so a pool is built once and every later request reads it.

A pool is keyed by what its arrays are a function of, and nothing else:
  * the task's meta-device data (`task.meta_data_key()`: the task, its data config and the
    generator's version or the data files' state);
  * the static encoders that encode them: the leaves under `task.encoder_prefixes` (the
    device model's dynamic leaves, which an edit and global_meta change, are never read by
    `task.encode_meta`; so `fda_on_global_meta` shares the plain FDA's pool);
  * the role sizes (the query size, and the context size when a stage renders fewer).
A request for devices [a, b) is served by a stored pool of the same key that holds them (a
slice), or extends a stored pool that starts at a (only the missing ids are encoded), or
encodes them anew. Pools are files WORKDIR/meta_pools/<key>-<first>-<count>.npz, so a resumed
or `--deploy_only` run reuses them; a damaged file is reported and encoded again. Deleting the
folder is always safe.
"""
import glob
import hashlib
import json
import os
import re
import zipfile

import jax
import numpy as np
from absl import logging

from mmpg_jax.core import params as P

FOLDER = "meta_pools"
_KEY_FIELD = "__pool_key__"


def encoder_digest(task, params) -> str:
  """A hash of the leaves `task.encode_meta` reads: those under `task.encoder_prefixes` (every
  leaf for a task that declares none)."""
  flat = P.flatten(params)
  prefixes = tuple(task.encoder_prefixes)
  h = hashlib.sha256()
  for path in sorted(flat):
    if not prefixes or path.startswith(prefixes):
      leaf = np.asarray(flat[path])
      h.update(f"{path}\0{leaf.dtype}\0{leaf.shape}\0".encode())
      h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def pool_key(task, params, query_size: int, context_size: int | None) -> str:
  """The key of a pool: data, encoder and role sizes (module docstring)."""
  blob = json.dumps({"data": task.meta_data_key(), "encoder": encoder_digest(task, params),
                     "query_size": int(query_size),
                     "context_size": None if context_size is None else int(context_size)},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _path(folder, key, first, count):
  return os.path.join(folder, f"{key}-{first}-{count}.npz")


def _stored(folder, key):
  """[(first, count, path)] of the key's stored pools, largest first."""
  out = []
  for p in glob.glob(os.path.join(folder, f"{key}-*-*.npz")):
    m = re.fullmatch(rf"{key}-(\d+)-(\d+)\.npz", os.path.basename(p))
    if m:
      out.append((int(m.group(1)), int(m.group(2)), p))
  return sorted(out, key=lambda e: -e[1])


def _load(path, key):
  """The pool in `path`, or None (logged, file removed) when it is damaged or not this key's."""
  try:
    with np.load(path, allow_pickle=False) as z:
      if _KEY_FIELD not in z.files or str(z[_KEY_FIELD]) != key:
        raise ValueError("its stored key does not match its name")
      return P.unflatten({k: z[k] for k in z.files if k != _KEY_FIELD})
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    logging.warning("meta-device pool %s is damaged (%s); it is removed and encoded again",
                    path, e)
    try:
      os.remove(path)
    except OSError:
      pass
    return None


def _save(folder, key, first, pool):
  """Writes atomically (temp file + rename); a full disk costs only the reuse, never the run."""
  count = len(jax.tree.leaves(pool)[0])
  path = _path(folder, key, first, count)
  tmp = path + ".tmp.npz"
  try:
    os.makedirs(folder, exist_ok=True)
    np.savez(tmp, **{_KEY_FIELD: np.asarray(key)}, **P.flatten(pool))
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("could not store the meta-device pool in %s (%s): later stages encode it "
                    "again", path, e)
    if os.path.exists(tmp):
      os.remove(tmp)
    return
  for f, c, p in _stored(folder, key):       # a pool this one extends is no longer needed
    if p != path and f >= first and f + c <= first + count:
      os.remove(p)


def _slice(pool, start, stop):
  return jax.tree.map(lambda v: v[start:stop], pool)


def cached(encode, task, params, ids, query_size: int, *, workdir: str | None,
           context_size: int | None = None, what: str = "meta devices") -> dict:
  """The encoded meta devices `ids` (a contiguous range): from WORKDIR/meta_pools when a stored
  pool of the same key holds them, else `encode(ids)` (for the ids missing) and stored.
  No workdir (None or "") encodes without storing."""
  ids = [int(i) for i in ids]
  if not workdir or not ids:            # no workdir ("" or None): encode, store nothing
    return encode(ids)
  first, count = ids[0], len(ids)
  if ids != list(range(first, first + count)):
    raise ValueError(f"meta-device pools hold contiguous id ranges; got {what} ids "
                     f"{ids[:3]}... of {count}")
  folder = os.path.join(workdir, FOLDER)
  key = pool_key(task, params, query_size, context_size)
  for f, c, path in _stored(folder, key):
    if f <= first and first + count <= f + c:
      pool = _load(path, key)
      if pool is not None:
        logging.info("%s: %d devices read from the stored pool %s", what, count,
                     os.path.basename(path))
        return _slice(pool, first - f, first - f + count)
  for f, c, path in _stored(folder, key):
    if f == first and c < count:               # a stored prefix: encode only the rest
      head = _load(path, key)
      if head is not None:
        logging.info("%s: %d of %d devices read from the stored pool %s", what, c, count,
                     os.path.basename(path))
        pool = jax.tree.map(lambda a, b: np.concatenate([a, b]), head, encode(ids[c:]))
        _save(folder, key, first, pool)
        return pool
  pool = encode(ids)
  _save(folder, key, first, pool)
  return pool
