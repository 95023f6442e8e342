"""Headline differences between rows of one or several runs' results, with paired intervals.

Each method is compared with the references a reader judges it by, as the config names them
(`config.report.references`, copied into results.json as `references`): row names, or
`best_rival`, the row of role "rival" with the best validation score in that run (chosen like
every other row, never on test devices). Per device, method − reference in the selection
metric; the mean and its paired bootstrap 95% interval over devices (stratified by run:
`stats`). This module knows roles and fields, never a method by name.
"""
import numpy as np

from mmpg_jax.reporting import stats, tables
from mmpg_jax.reporting.formats import SUFFIX

BEST_RIVAL = "best_rival"


def references(runs) -> tuple:
  """The references the runs' configs named, in order (a run written before results.json
  carried them has none)."""
  return tuple(dict.fromkeys(ref for r in runs for ref in r.get("references", ())))


def best_rival(results, sel: str):
  """The rival row with the best validation score (None if the run has none)."""
  m = results["methods"]
  rivals = [n for n in m if m[n].get("role") == "rival"]
  if not rivals:
    return None
  # every task's selection metric is higher-is-better (accuracy, R@1, uauc)
  return max(rivals, key=lambda n: m[n].get(f"validation_{sel}", -np.inf))


def ood_choice(results, sel: str, ood_rows=()):
  """The out-of-distribution claim validation makes: among `ood_rows` (the config's
  `report.ood_rows`: the plain rows a robustness claim is weighed against) and the rows whose
  choices are made for robustness (`selected_on` val_ood), the one with the best mean on the
  validation OOD devices, with its test OOD figure. None without val_ood devices."""
  m = results["methods"]
  key = sel + "_val_ood"
  rows = [n for n in m if (n in ood_rows or m[n].get("selected_on") == "val_ood")
          and key in m[n]["metrics"]]
  if not rows:
    return None
  best = max(rows, key=lambda n: m[n]["metrics"][key])
  return {"row": best, "candidates": rows, "val_ood": m[best]["metrics"][key],
          "test_ood": m[best]["metrics"].get(sel + "_ood"),
          "plain": {n: m[n]["metrics"].get(sel + "_ood") for n in ood_rows if n in m}}


def _reference_row(results, ref, sel):
  return best_rival(results, sel) if ref == BEST_RIVAL else ref


def entry_clusters(results, grp):
  """Per-entry device ids of a group (stream tasks: entries are (device, window) pairs), or
  None where every entry is its own device."""
  ids = results.get("entry_device_ids", {}).get(grp)
  return None if ids is None else np.asarray(ids)


def differences(runs, sel: str, *, refs=None, methods=None, seed: int = 0) -> dict:
  """{reference: {method: {group: (mean, low, high)}}} of method − reference in metric `sel`,
  pooled over `runs` (a list of results dicts), for each reference (`refs`, default the
  runs' own `references`) present in them."""
  names = methods or list(dict.fromkeys(n for r in runs for n in r["methods"]))
  out = {}
  for ref in (references(runs) if refs is None else refs):
    per_ref = {}
    for name in names:
      per_grp = {}
      for grp, sfx in SUFFIX.items():
        diffs, clusters = [], []
        for r in runs:
          row = _reference_row(r, ref, sel)
          m = r["methods"]
          if row is None or row == name or row not in m or name not in m:
            continue
          a, b = m[name]["per_device"].get(sel + sfx), m[row]["per_device"].get(sel + sfx)
          if a is None or b is None:
            continue
          diffs.append(np.asarray(a, np.float64) - np.asarray(b, np.float64))
          clusters.append(entry_clusters(r, grp))
        if diffs:
          per_grp[grp] = stats.paired_bootstrap(diffs, clusters, seed=seed)
      if per_grp:
        per_ref[name] = per_grp
    if per_ref:
      out[ref] = per_ref
  return out


def fmt_interval(interval, scale: float = 1.0, decimals: int = 1) -> str:
  """'+1.2 [+0.3, +2.1]*' (the star: the interval excludes 0)."""
  if interval is None or not np.all(np.isfinite(interval)):
    return "–"
  mean, lo, hi = (scale * x for x in interval)
  star = "*" if stats.excludes_zero(interval) else ""
  return f"{mean:+.{decimals}f} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]{star}"


def table_lines(diffs, metric, groups=("test", "test_ood")) -> list:
  """A markdown table: per method, its difference from each reference, per group."""
  refs = list(diffs)
  if not refs:
    return []
  scale = 100 if metric.percent else 1
  names = list(dict.fromkeys(n for r in refs for n in diffs[r]))
  head = ["method"] + [f"− {r} ({'OOD' if g == 'test_ood' else g})"
                      for r in refs for g in groups]
  rows = [[n] + [fmt_interval(diffs[r].get(n, {}).get(g), scale, metric.decimals)
                 for r in refs for g in groups] for n in names]
  return tables.table(head, rows)
