"""Cloud-side batch generation of edits for many devices: jit(vmap(generate)), sharded.

Uploads are checked at the boundary (`validate_upload`): a device may send anything, and a bad
upload must be refused with a message, never turned into a silently wrong edit. An upload is
what `cdc_mmpg.device_upload` makes on a device: `{'anchors': {modality: [K, E]}, 'weights':
{modality: [K]}, 'summary'?: [S]}` — the same pytree the evaluated method feeds the FDA, so the
batch path and the evaluated path give the same edits. Valid uploads sharing their anchor
budgets are generated in fixed-size chunks of devices (`device_batch`, so memory stays flat
however many devices there are and the function compiles once); each chunk's device axis is
sharded with NamedSharding over a Mesh of every accelerator (JAX's own SPMD runtime; on a
multi-host TPU pod the mesh spans all hosts after `jax.distributed.initialize()`).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from mmpg_jax.adapt import fda as fda_lib


class UploadError(ValueError):
  """A device's upload (anchors, weights, summary) is malformed."""


def validate_anchors(anchors, weights, anchor_dim: int, max_anchors: int | None = None,
                     modality: str = "video"):
  """Checks one modality's anchor set; returns (anchors float32 [K, E], weights summing to 1)."""
  a = np.asarray(anchors)
  if a.dtype.kind not in "f":
    raise UploadError(f"{modality} anchors have dtype {a.dtype}; expected floating-point "
                      f"embeddings (float32 or float16). Send the ADR's output unchanged.")
  if a.ndim != 2 or a.shape[1] != anchor_dim:
    raise UploadError(f"{modality} anchors have shape {a.shape}; expected [K, {anchor_dim}] (K "
                      f"anchors of the {anchor_dim}-dimensional {modality} elements).")
  k = a.shape[0]
  if k == 0:
    raise UploadError(f"empty anchor set: the device sent 0 {modality} anchors; ADR must send "
                      f"at least 1.")
  if max_anchors is not None and k > max_anchors:
    raise UploadError(f"{k} {modality} anchors uploaded but at most {max_anchors} are accepted; "
                      f"run ADR with K <= {max_anchors}.")
  bad = ~np.isfinite(a)
  if bad.any():
    rows = np.unique(np.nonzero(bad)[0])
    raise UploadError(f"{modality} anchors contain {int(bad.sum())} NaN/Inf values (anchor rows "
                      f"{rows[:8].tolist()}); the device's encoder produced non-finite "
                      f"embeddings. Nothing was generated.")
  w = np.full(k, 1.0 / k, np.float32) if weights is None else np.asarray(weights)
  if w.dtype.kind not in "fiu" or w.shape != (k,):
    raise UploadError(f"{modality} weights have shape {w.shape} and dtype {w.dtype}; expected "
                      f"[{k}] non-negative numbers, one per anchor.")
  if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
    raise UploadError(f"{modality} weights must be finite, non-negative and not all zero.")
  return a.astype(np.float32), (w / w.sum()).astype(np.float32)


def validate_upload(upload, spec: dict, max_anchors: int | None = None) -> dict:
  """Checks one device's upload against the FDA's `upload_spec()`; returns it normalised."""
  if not isinstance(upload, dict) or not isinstance(upload.get("anchors"), dict):
    raise UploadError("an upload is {'anchors': {modality: [K, E]}, 'weights': {modality: [K]}"
                      "(, 'summary': [S])} as cdc_mmpg.device_upload makes it; got "
                      f"{type(upload).__name__}")
  want = spec["anchors"]
  missing = [m for m in want if m not in upload["anchors"]]
  if missing:
    raise UploadError(f"the upload has no {missing} anchors; this FDA was meta-trained with "
                      f"anchors of {tuple(want)} and needs every one of them (the device sends "
                      f"what ADR selects from each modality of its context).")
  extra = [m for m in upload["anchors"] if m not in want]
  if extra:
    raise UploadError(f"the upload has anchors of {extra}, which this FDA was not trained with "
                      f"(it takes {tuple(want)}).")
  weights = upload.get("weights") or {}
  out = {"anchors": {}, "weights": {}}
  for m, dim in want.items():
    out["anchors"][m], out["weights"][m] = validate_anchors(
        upload["anchors"][m], weights.get(m), dim, max_anchors, m)
  if spec["summary"]:
    s = upload.get("summary")
    if s is None:
      raise UploadError(f"the upload has no 'summary'; this FDA was meta-trained with the "
                        f"device's {spec['summary']}-float summary (its forward-only label-shift "
                        f"estimate) beside the anchors.")
    s = np.asarray(s)
    if s.shape != (spec["summary"],) or s.dtype.kind != "f" or not np.isfinite(s).all():
      raise UploadError(f"the summary has shape {s.shape} and dtype {s.dtype}; expected "
                        f"[{spec['summary']}] finite floats.")
    out["summary"] = s.astype(np.float32)
  elif upload.get("summary") is not None:
    raise UploadError("the upload carries a summary, which this FDA was not trained with.")
  return out


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


class EditGenerator:
  """Edits for many devices at once: `gen(uploads) -> edits`, uploads an upload pytree whose
  leaves have a leading device axis N; every edit leaf gets the same leading axis."""

  def __init__(self, fda, fda_params, device_batch: int = 256, mesh=None,
               max_anchors: int | None = None):
    self.fda, self.fda_params = fda, fda_params
    self.mesh = mesh or make_mesh()
    n = self.mesh.devices.size
    if device_batch % n:
      raise ValueError(f"device_batch={device_batch} must be a multiple of the {n} "
                       f"accelerators in the mesh")
    self.device_batch, self.max_anchors = device_batch, max_anchors
    self._batch = NamedSharding(self.mesh, PS("data"))
    self._replicated = NamedSharding(self.mesh, PS())
    self._params = jax.device_put(fda_params, self._replicated)
    self._fn = jax.jit(jax.vmap(lambda p, u: fda_lib.generate(fda, p, u), in_axes=(None, 0)),
                       out_shardings=self._batch)

  def validate(self, uploads):
    n = len(jax.tree.leaves(uploads)[0])
    spec = self.fda.upload_spec()
    checked = [validate_upload(jax.tree.map(lambda x: x[i], uploads), spec, self.max_anchors)
               for i in range(n)]
    for m in spec["anchors"]:
      ks = {c["anchors"][m].shape[0] for c in checked}
      if len(ks) != 1:
        raise UploadError(f"a batch must share one anchor budget K per modality; got {m} K in "
                          f"{sorted(ks)}. Group uploads by K.")
    return jax.tree.map(lambda *xs: np.stack(xs), *checked)

  def __call__(self, uploads, validate: bool = True):
    if validate:
      uploads = self.validate(uploads)
    n, b = len(jax.tree.leaves(uploads)[0]), self.device_batch
    parts = []
    for s in range(0, n, b):
      chunk = jax.tree.map(lambda x: np.asarray(x)[s:s + b], uploads)
      pad = b - len(jax.tree.leaves(chunk)[0])
      if pad:                                   # fixed shapes: one compile for every chunk
        chunk = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)]), chunk)
      out = self._fn(self._params, jax.device_put(chunk, self._batch))
      parts.append(jax.tree.map(lambda x: np.asarray(x)[:b - pad], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
