"""Statistics for results tables: sample spreads and paired bootstrap intervals.

A difference between two methods is measured on the same devices, so it is paired: per device,
method − reference. Its 95% interval comes from the bootstrap over devices (Efron &
Tibshirani), stratified by run when several runs (seeds, each with its own devices) are pooled:
a replicate resamples each run's devices with replacement and averages the runs' means, so a
run with more devices does not weigh more and seeds are never mixed within a device's pair.
A stream task's entries are (device, window) pairs; `clusters` resamples whole devices, since
one device's windows are not independent.
"""
import numpy as np

N_BOOT = 4000


def sample_std(xs) -> float:
  """The sample standard deviation (ddof=1) of the finite values; nan below two of them."""
  xs = np.asarray(xs, np.float64)
  xs = xs[np.isfinite(xs)]
  return float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")


def _cluster_sums(diff, clusters):
  """(per-cluster sums, per-cluster counts) of the finite differences of one run."""
  diff = np.asarray(diff, np.float64)
  ok = np.isfinite(diff)
  ids = np.arange(len(diff)) if clusters is None else np.asarray(clusters)
  _, inv = np.unique(ids[ok], return_inverse=True)
  sums = np.bincount(inv, weights=diff[ok]) if ok.any() else np.zeros(0)
  counts = np.bincount(inv).astype(np.float64) if ok.any() else np.zeros(0)
  return sums, counts


def paired_bootstrap(diffs, clusters=None, *, level: float = 0.95, n_boot: int = N_BOOT,
                     seed: int = 0):
  """(mean, low, high) of the mean paired difference: `diffs` a list of per-run arrays (one
  value per entry: method − reference), `clusters` a matching list of per-entry device ids (or
  None: every entry its own device). Non-finite differences are left out (a user lacking a
  class has no AUC). The percentile interval of `n_boot` stratified replicates."""
  if isinstance(diffs, np.ndarray) and diffs.ndim == 1:
    diffs = [diffs]
  clusters = [None] * len(diffs) if clusters is None else clusters
  per_run = [_cluster_sums(d, c) for d, c in zip(diffs, clusters)]
  per_run = [(s, n) for s, n in per_run if len(s)]
  if not per_run:
    return float("nan"), float("nan"), float("nan")
  mean = float(np.mean([s.sum() / n.sum() for s, n in per_run]))
  rng = np.random.default_rng(seed)
  reps = np.zeros(n_boot)
  for s, n in per_run:
    idx = rng.integers(0, len(s), size=(n_boot, len(s)))
    reps += s[idx].sum(1) / np.maximum(n[idx].sum(1), 1e-12)
  reps /= len(per_run)
  a = (1.0 - level) / 2.0
  lo, hi = np.quantile(reps, [a, 1.0 - a])
  return mean, float(lo), float(hi)


def excludes_zero(interval) -> bool:
  """Whether a (mean, low, high) interval lies wholly on one side of 0."""
  _, lo, hi = interval
  return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))
