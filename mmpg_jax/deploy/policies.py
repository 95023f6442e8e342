"""Request policies: when a device asks the cloud for a new edit. Pure numpy over a split's
*stream arrays* (deploy.streams), so every policy and every budget is one cheap replay.

Stream arrays of a split (D devices, W window positions, a device's windows in time order):
  base   [D, W]     the selection metric of the device model without any edit (`never`)
  edited [D, W, W]  edited[d, t, r]: the metric at window t under the edit requested at r <= t
  drift  [D, W, W]  drift[d, t, r]: MMD^2 between the anchors the device sent at r and its
                    window-t elements (label-free; what it can compute on its own)
  cloud  [D, W]     MMD^2 between the cloud's reference elements and the window-t elements
                    (the reference a device has before its first request)
  valid  [D, W]     the device has a window at this position
  device [D]        device ids (every_k's per-device phase)

A device starts on the global model. At each window a policy sees only label-free features
(its drift since its last request, or from the cloud's reference before the first; windows
since the last request) and decides; after a request the window is served by the new edit,
otherwise by the last one received (or the global model before any).
"""
import numpy as np

POLICIES = ("always", "never", "every_k", "drift", "learned")
THRESHOLDED = ("drift", "learned")


def features(arrays, t, last):
  """The label-free features at window t given each device's last request (-1: none):
  score (drift from the last request's anchors, or from the cloud's reference), windows since
  the last request (t + 1 before the first), never-asked flag, drift from the cloud."""
  d = np.arange(arrays["base"].shape[0])
  asked = last >= 0
  score = np.where(asked, arrays["drift"][d, t, np.maximum(last, 0)], arrays["cloud"][:, t])
  since = np.where(asked, t - last, t + 1).astype(np.float64)
  return {"score": score, "since": since, "never": (~asked).astype(np.float64),
          "cloud": arrays["cloud"][:, t]}


def design(f) -> np.ndarray:
  """The learned policy's inputs: a small fixed basis of the label-free features."""
  return np.stack([np.ones_like(f["score"]), f["score"], f["cloud"], f["never"],
                   np.log1p(f["since"]), f["score"] * f["never"]], -1)


def decide(policy: str, param, arrays, t, last, weights=None):
  """[D] bool: which devices request at window t."""
  n = arrays["base"].shape[0]
  if policy == "always":
    return np.ones(n, bool)
  if policy == "never":
    return np.zeros(n, bool)
  if policy == "every_k":
    k = int(param)
    if k == 0:                        # a zero budget: never
      return np.zeros(n, bool)
    # a fixed per-device phase spreads the requests over windows (and, for k beyond a stream's
    # length, over devices), so the request share is ~1/k whatever the stream's length
    phase = (np.asarray(arrays["device"], np.int64) * 2654435761) % k
    return (t + phase) % k == 0
  f = features(arrays, t, last)
  if policy == "drift":
    return f["score"] > param
  if policy == "learned":
    return design(f) @ weights > param
  raise ValueError(f"unknown request policy {policy!r}; known: {POLICIES}")


def replay(policy: str, param, arrays, weights=None):
  """(metric [D, W], requested [D, W]) of a policy over a split (invalid cells: nan/False)."""
  n, w = arrays["base"].shape
  last = np.full(n, -1)
  asked = np.zeros((n, w), bool)
  for t in range(w):
    req = decide(policy, param, arrays, t, last, weights) & arrays["valid"][:, t]
    last = np.where(req, t, last)
    asked[:, t] = req
  return serve(arrays["base"], arrays["edited"], asked, arrays["valid"]), asked


def serve(base, edited, asked, valid):
  """[D, W] the metric each window is served with: the edit of the last request up to it, or
  the global model before any (any metric's arrays, for one set of request decisions)."""
  n, w = base.shape
  d = np.arange(n)
  last = np.full(n, -1)
  metric = np.full((n, w), np.nan)
  for t in range(w):
    last = np.where(asked[:, t], t, last)
    served = np.where(last >= 0, edited[d, t, np.maximum(last, 0)], base[:, t])
    metric[:, t] = np.where(valid[:, t], served, np.nan)
  return metric


def rate(asked, valid) -> float:
  return float(asked[valid].mean()) if valid.any() else 0.0


def fit_learned(arrays, ridge: float = 1e-3) -> np.ndarray:
  """Least squares of a request's gain (the metric under a fresh edit minus the metric of what
  the device would otherwise run) on the label-free features, over every (window, last
  request) pair of the given streams. The gains read labels: fit only on the cloud's own
  streams (validation), never on evaluation devices."""
  base, edited, valid = arrays["base"], arrays["edited"], arrays["valid"]
  n, w = base.shape
  d = np.arange(n)
  xs, ys = [], []
  for t in range(w):
    for last in range(-1, t):
      lv = np.full(n, last)
      cur = base[:, t] if last < 0 else edited[d, t, last]
      gain = edited[d, t, t] - cur
      ok = valid[:, t] & np.isfinite(gain) & (True if last < 0 else valid[:, last])
      if ok.any():
        xs.append(design(features(arrays, t, lv))[ok])
        ys.append(gain[ok])
  x, y = np.concatenate(xs), np.concatenate(ys)
  scale = np.maximum(np.abs(x).max(0), 1e-12)        # well-conditioned whatever the units
  xn = x / scale
  coef = np.linalg.solve(xn.T @ xn + ridge * len(y) * np.eye(x.shape[1]), xn.T @ y)
  return coef / scale


def calibrate(policy: str, budget: float, arrays, weights=None):
  """The policy's parameter whose request share on these (validation) streams is nearest the
  budget: every_k's k = round(1 / budget); a threshold by bisection (the share falls as the
  threshold rises)."""
  if policy in ("always", "never"):
    return None
  if policy == "every_k":
    return max(1, int(round(1.0 / budget))) if budget > 0 else 0
  valid = arrays["valid"]
  lo, hi = -1.0, 1.0
  while rate(replay(policy, lo, arrays, weights)[1], valid) < budget and lo > -1e9:
    lo *= 4.0
  while rate(replay(policy, hi, arrays, weights)[1], valid) > budget and hi < 1e9:
    hi *= 4.0
  best = (abs(rate(replay(policy, hi, arrays, weights)[1], valid) - budget), hi)
  for _ in range(40):
    mid = 0.5 * (lo + hi)
    r = rate(replay(policy, mid, arrays, weights)[1], valid)
    best = min(best, (abs(r - budget), mid))
    if r > budget:
      lo = mid
    else:
      hi = mid
  return float(best[1])


def kept_share(runs, n_boot: int = 2000, seed: int = 0):
  """(share, low, high) of the always-ask gain a policy keeps, (policy - never) / (always -
  never) of the mean metric. `runs`: one (policy, never, always) triple of per-device values
  per run (seeds); each run's mean weighs the same, and the 95% interval resamples devices
  within each run (stratified, as mmpg_jax.reporting.stats does for paired differences)."""
  runs = [tuple(np.asarray(x, np.float64) for x in r) for r in runs]

  def share(idx):
    kept = np.mean([np.nanmean(p[i]) - np.nanmean(n[i]) for (p, n, _), i in zip(runs, idx)])
    gain = np.mean([np.nanmean(a[i]) - np.nanmean(n[i]) for (_, n, a), i in zip(runs, idx)])
    return kept / gain if abs(gain) > 1e-12 else float("nan")    # no gain: undefined

  value = float(share([np.arange(len(r[0])) for r in runs]))
  rng = np.random.default_rng(seed)
  reps = np.array([share([rng.integers(0, len(r[0]), len(r[0])) for r in runs])
                   for _ in range(n_boot)])
  reps = reps[np.isfinite(reps)]
  if not len(reps):
    return value, float("nan"), float("nan")
  lo, hi = np.quantile(reps, [0.025, 0.975])
  return value, float(lo), float(hi)
