"""The upload: what a device sends to the cloud, and the checks it passes there.

    Upload(anchors={modality: [K, E]}, weights={modality: [K]}, summary=[S] or None)

`anchors` are the ADR's selected anchor elements per modality, `weights` their masses (summing
to 1; an anchor of weight 0 is ignored exactly), `summary` the device's own forward-only
summary (e.g. its EM label-shift estimate), None where the FDA reads none. A registered pytree:
it vmaps over devices, stacks into batches and jits like any array tree. The cloud checks an
upload from outside the process with `validate_upload` before it generates anything.
"""
import flax.struct
import numpy as np


@flax.struct.dataclass
class Upload:
  anchors: dict                 # {modality: [K, E]}
  weights: dict                 # {modality: [K]}
  summary: object = None        # [S] or None

  def as_dict(self) -> dict:
    """The plain-dict form (what a device outside this process sends)."""
    out = {"anchors": dict(self.anchors), "weights": dict(self.weights)}
    if self.summary is not None:
      out["summary"] = self.summary
    return out


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


def validate_upload(upload, spec: dict, max_anchors: int | None = None) -> Upload:
  """Checks one device's upload (an `Upload`, or its dict form from outside the process)
  against the FDA's `upload_spec()`; returns it normalised, as an `Upload`."""
  if isinstance(upload, Upload):
    upload = upload.as_dict()
  if not isinstance(upload, dict) or not isinstance(upload.get("anchors"), dict):
    raise UploadError("an upload is {'anchors': {modality: [K, E]}, 'weights': {modality: [K]}"
                      "(, 'summary': [S])}, as fda.round_trip.device_upload makes it; got "
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
  return Upload(**out)
