"""A split's stream arrays (deploy.policies): every device's windows in time order, the metric
of each window under an edit requested at any earlier window of the same device, and the
label-free drift a device can compute between windows.

Entries are (device, window) pairs (`device_id`, `window`); a split without windows is one
window per device. `edited[d, t, r]` runs the method's own adapt on the entry at position r
(its uploaded roles and its window's device key) and scores it on the entry at position t's
query: the edit a device received at r, still in use at t.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.ondevice import adr, device

REFERENCE_ELEMENTS = 256


def layout(feats):
  """(row [n], pos [n], device ids [D], table [D, W] of entry indices or -1)."""
  ids = np.asarray(feats["device_id"])
  win = np.asarray(feats["window"]) if "window" in feats else np.zeros(len(ids), np.int64)
  devices, row = np.unique(ids, return_inverse=True)
  order = np.lexsort((win, ids))
  pos = np.zeros(len(ids), np.int64)
  first = {}
  for i, e in enumerate(order):
    first.setdefault(row[e], i)
    pos[e] = i - first[row[e]]
  table = np.full((len(devices), int(pos.max()) + 1 if len(pos) else 1), -1)
  table[row, pos] = np.arange(len(ids))
  return row, pos, devices, table


def shifted(task, feats, src, dst):
  """Entries `dst` with every role but the query (and the window) taken from entries `src`."""
  out = {}
  for k, v in feats.items():
    from_src = (k in task.roles and k != task.query_role) or k == "window"
    out[k] = jax.tree.map(lambda x: np.asarray(x)[src if from_src else dst], v)
  return out


def elements_of(task, ctx):
  return task.anchor_elements(ctx)[task.anchor_modalities[0]]


def cloud_reference(task, feats, seed: int, n: int = REFERENCE_ELEMENTS):
  """[n, E] the cloud's reference elements: a seeded draw from the first windows of the given
  (validation) devices, what a device compares its windows with before its first request."""
  _, pos, _, _ = layout(feats)
  first = np.flatnonzero(pos == 0)
  el = np.asarray(jax.vmap(lambda c: elements_of(task, c))(
      jax.tree.map(lambda x: np.asarray(x)[first], feats[task.context_role])))
  el = el.reshape(-1, el.shape[-1])
  pick = np.random.default_rng(seed).choice(len(el), size=min(n, len(el)), replace=False)
  return el[np.sort(pick)]


def drift_fn(task, selector: str, k: int, seed: int):
  """(request ctx, current ctx, device id, request window, reference) -> (drift from the
  request's anchors, drift from the reference), both MMD^2 against the current elements."""
  def one(ctx_r, ctx_t, dev_id, window, reference):
    el_r, el_t = elements_of(task, ctx_r), elements_of(task, ctx_t)
    key = device.device_key(seed, {"device_id": dev_id, "window": window})
    a, w = adr.select(el_r, min(k, el_r.shape[0]), selector, key)
    u = jnp.full(reference.shape[0], 1.0 / reference.shape[0])
    return adr.mmd2(a, w, el_t), adr.mmd2(reference, u, el_t)
  return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)))


def stream_arrays(evaluator, method, params, feats, hp, reference, drift, metrics):
  """The split's stream arrays for `method` at hyper-parameters `hp` (deploy.policies), on the
  first of `metrics` ({name: sign}, sign making higher better); `by_metric` holds (base,
  edited) of each."""
  task = evaluator.task
  row, pos, devices, table = layout(feats)
  nd, w = table.shape
  valid = table >= 0
  base = {k: np.full((nd, w), np.nan) for k in metrics}
  edited = {k: np.full((nd, w, w), np.nan) for k in metrics}
  dr = np.full((nd, w, w), np.nan)
  cloud = np.full((nd, w), np.nan)
  never = evaluator.identity_metrics(params, feats)
  for k, sign in metrics.items():
    base[k][row, pos] = sign * np.asarray(never[k])
  win = np.asarray(feats["window"]) if "window" in feats else np.zeros(len(row), np.int32)
  for o in range(w):
    dst = np.flatnonzero(pos >= o)
    src = table[row[dst], pos[dst] - o]
    part = shifted(task, feats, src, dst)
    values = evaluator.per_device_metrics(method, params, part, hp)
    for k, sign in metrics.items():
      edited[k][row[dst], pos[dst], pos[dst] - o] = sign * np.asarray(values[k])
    ctx = task.context_role
    d_req, d_ref = evaluator.chunked(
        lambda p: drift(p["r"], p["t"], p["device_id"], p["window"], reference),
        {"r": jax.tree.map(lambda x: np.asarray(x)[src], feats[ctx]),
         "t": jax.tree.map(lambda x: np.asarray(x)[dst], feats[ctx]),
         "device_id": np.asarray(feats["device_id"])[dst], "window": win[src]})
    dr[row[dst], pos[dst], pos[dst] - o] = d_req
    if o == 0:
      cloud[row[dst], pos[dst]] = d_ref
  first = next(iter(metrics))
  return {"base": base[first], "edited": edited[first], "drift": dr, "cloud": cloud,
          "valid": valid, "device": devices,
          "by_metric": {k: (base[k], edited[k]) for k in metrics}}
