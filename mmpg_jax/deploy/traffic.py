"""Compressed traffic: a method's uplink and downlink under each encoding (mmpg_jax.core.codec), on a
float or an int8 device model.

- Uplink: the device's context features (the anchor elements ADR selects from, or sends whole)
  go through the encoding before the method reads them, so the cloud generates from what it
  would receive. For element-picking selectors this is exactly the anchors' round trip.
- Downlink: each leaf's change under the method's edit, delta = adapted - global, goes through
  the encoding and the device adds what it receives to its own copy of the model:
  device + decode(encode(delta)). (For a low-rank edit this encodes the materialised change,
  not the factors; its bytes are counted as the method sends them.)
- int8 device model: every float leaf of the device model stored as int8 with per-row scales
  (the encoders' cached features still come from the float encoders); the edit is added to it.

Bytes per request: the method's own uplink and downlink float counts at the encoding's width,
plus one float16 scale per row for the integer encodings (rows of the anchor dimension up, of
the edited leaves' mean row length down).
"""
import dataclasses

import jax
import numpy as np

from mmpg_jax.core import codec
from mmpg_jax.core import params as P
from mmpg_jax.ondevice import costs


def sends(cost) -> bool:
  return cost.uplink_bytes > 0 or cost.downlink_bytes > 0


def encoded(method, task, encoding: str, int8_model: bool, cost):
  """`method` with its traffic through `encoding` (and on an int8 device model)."""
  up, down = cost.uplink_bytes > 0, cost.downlink_bytes > 0
  ctx_role = task.context_role

  def adapt(params, dev, hp):
    if up:
      dev = dict(dev, **{ctx_role: codec.tree_roundtrip(dev[ctx_role], encoding)})
    adapted = method.adapt(params, dev, hp)
    held = codec.tree_roundtrip(params, "int8") if int8_model else params
    if not down:
      return held if int8_model else adapted
    return jax.tree.map(lambda h, a, p: h + codec.roundtrip(a - p, encoding).astype(h.dtype),
                        held, adapted, params)

  name = f"{method.name}@{encoding}" + ("+int8_model" if int8_model else "")
  return dataclasses.replace(method, name=name, adapt=adapt, diagnostics={},
                             per_device_diagnostics=())


def row_lengths(task, model, params, cfg) -> tuple:
  """(uplink row length, downlink row length): the anchor dimension; the dynamic leaves' mean
  row length (values / rows over the leaves an edit may change)."""
  up = next(iter(task.anchor_dims(model, params).values()))
  dyn = [v for p, v in P.flatten(params).items() if p in set(P.select(params,
                                                                       cfg.dynamic_leaves))]
  size = sum(int(np.prod(v.shape)) for v in dyn)
  rows = sum(int(np.prod(v.shape[:-1])) if v.ndim > 1 else 1 for v in dyn)
  return up, size / max(rows, 1)


def request_bytes(cost, encoding: str, rows: tuple, comm_dtype: str) -> dict:
  """{'uplink', 'downlink'} bytes of one request under `encoding`."""
  width = costs.dtype_bytes(comm_dtype)
  return {"uplink": codec.encoded_bytes(cost.uplink_bytes / width, rows[0], encoding),
          "downlink": codec.encoded_bytes(cost.downlink_bytes / width, rows[1], encoding)}


def choose(rows: list, tolerance: float) -> str:
  """The smallest encoding (bytes per request) whose validation metric is within `tolerance`
  of float32's on the float device model. rows: [{encoding, int8_model, bytes, validation}]."""
  ref = next(r for r in rows if r["encoding"] == "float32" and not r["int8_model"])
  ok = [r for r in rows if not r["int8_model"]
        and r["validation"] >= ref["validation"] - tolerance]
  return min(ok, key=lambda r: (r["bytes"], codec.ENCODINGS.index(r["encoding"])))["encoding"]
