"""Cloud-side batch generation of edits for many devices: jit(vmap(generate)), sharded.

Uploads are checked at the boundary (`validate_upload`): a device may send anything, and a bad
upload must be refused with a message, never turned into a silently wrong edit. Valid uploads
of one anchor budget K are generated in fixed-size chunks of devices (`device_batch`, so memory
stays flat however many devices there are and the function compiles once); each chunk's device
axis is sharded with NamedSharding over a Mesh of every accelerator (JAX's own SPMD runtime; on
a multi-host TPU pod the mesh spans all hosts after `jax.distributed.initialize()`).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from mmpg_jax.adapt import fda as fda_lib


class UploadError(ValueError):
  """A device's upload (anchors, weights) is malformed."""


def validate_upload(anchors, weights, anchor_dim: int, max_anchors: int | None = None):
  """Checks one device's upload; returns (anchors float32 [K, E], weights summing to 1)."""
  a = np.asarray(anchors)
  if a.dtype.kind not in "f":
    raise UploadError(f"anchors have dtype {a.dtype}; expected floating-point frame embeddings "
                      f"(float32 or float16). Send the ADR's output unchanged.")
  if a.ndim != 2 or a.shape[1] != anchor_dim:
    raise UploadError(f"anchors have shape {a.shape}; expected [K, {anchor_dim}] (K anchors of "
                      f"{anchor_dim} = frame embedding + temporal difference).")
  k = a.shape[0]
  if k == 0:
    raise UploadError("empty anchor set: the device sent 0 anchors; ADR must send at least 1.")
  if max_anchors is not None and k > max_anchors:
    raise UploadError(f"{k} anchors uploaded but at most {max_anchors} are accepted; run ADR "
                      f"with K <= {max_anchors}.")
  bad = ~np.isfinite(a)
  if bad.any():
    rows = np.unique(np.nonzero(bad)[0])
    raise UploadError(f"anchors contain {int(bad.sum())} NaN/Inf values (anchor rows "
                      f"{rows[:8].tolist()}); the device's frame encoder produced non-finite "
                      f"embeddings. Nothing was generated.")
  w = np.full(k, 1.0 / k, np.float32) if weights is None else np.asarray(weights)
  if w.dtype.kind not in "fiu" or w.shape != (k,):
    raise UploadError(f"weights have shape {w.shape} and dtype {w.dtype}; expected [{k}] "
                      f"non-negative numbers, one per anchor.")
  if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
    raise UploadError("weights must be finite, non-negative and not all zero.")
  return a.astype(np.float32), (w / w.sum()).astype(np.float32)


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


class EditGenerator:
  """Edits for many devices at once: `gen(anchors [N, K, E], weights [N, K]) -> edits`, each
  leaf with a leading device axis N."""

  def __init__(self, fda, fda_params, anchor_dim: int, device_batch: int = 256, mesh=None,
               max_anchors: int | None = None):
    self.fda, self.fda_params, self.anchor_dim = fda, fda_params, anchor_dim
    self.mesh = mesh or make_mesh()
    n = self.mesh.devices.size
    if device_batch % n:
      raise ValueError(f"device_batch={device_batch} must be a multiple of the {n} "
                       f"accelerators in the mesh")
    self.device_batch, self.max_anchors = device_batch, max_anchors
    self._batch = NamedSharding(self.mesh, PS("data"))
    self._replicated = NamedSharding(self.mesh, PS())
    self._params = jax.device_put(fda_params, self._replicated)
    self._fn = jax.jit(jax.vmap(lambda p, a, w: fda_lib.generate(fda, p, a, w),
                                in_axes=(None, 0, 0)),
                       out_shardings=self._batch)

  def validate(self, anchors, weights):
    pairs = [validate_upload(a, None if weights is None else w, self.anchor_dim,
                             self.max_anchors)
             for a, w in zip(anchors, weights if weights is not None else [None] * len(anchors))]
    ks = {a.shape[0] for a, _ in pairs}
    if len(ks) != 1:
      raise UploadError(f"a batch must share one anchor budget K; got K in {sorted(ks)}. "
                        f"Group uploads by K.")
    return np.stack([a for a, _ in pairs]), np.stack([w for _, w in pairs])

  def __call__(self, anchors, weights=None, validate: bool = True):
    if validate:
      anchors, weights = self.validate(anchors, weights)
    n, b = len(anchors), self.device_batch
    parts = []
    for s in range(0, n, b):
      a, w = anchors[s:s + b], weights[s:s + b]
      pad = b - len(a)
      if pad:                                   # fixed shapes: one compile for every chunk
        a = np.concatenate([a, np.repeat(a[-1:], pad, 0)])
        w = np.concatenate([w, np.repeat(w[-1:], pad, 0)])
      out = self._fn(self._params, jax.device_put(a, self._batch),
                     jax.device_put(w, self._batch))
      parts.append(jax.tree.map(lambda x: np.asarray(x)[:b - pad], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
