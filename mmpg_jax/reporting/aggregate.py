r"""Mean and spread over seeds, and paired intervals: markdown tables from several runs'
results.json.

  python -m mmpg_jax.reporting.aggregate runs/seed0 runs/seed1 runs/seed2 [> table.md]
      [--metrics uauc,ndcg@10,hr@10,auc]            more metrics, each with its intervals
      [--rows LABEL=runs/b0,runs/b1,runs/b2 ...]    run i's `global` row from another run
                                                    on the same data (another backbone, the
                                                    official DUET model), named LABEL

± is the sample standard deviation (ddof=1) over runs. The differences table pools every run's
devices: per device, method − reference (the references the runs' configs name in
`report.references`, e.g. global, global_meta, fta_k5 and the run's best rival), with a paired
bootstrap 95% interval stratified by run (mmpg_jax.reporting.stats);
* marks an interval that excludes 0. Runs should come from one machine (name it with the
table) and vary `seed` and `data.seed` together, so devices and meta pools change too.
Runs with deployment studies also get their request-policy, rollback and traffic tables
(mmpg_jax.aggregate_deploy).
"""
import argparse
import json
import os
import sys

import numpy as np

from mmpg_jax import tasks
from mmpg_jax.core.protocol import BASE
from mmpg_jax.reporting import aggregate_deploy, comparisons, stats, tables


def load(paths):
  out = []
  for p in paths:
    f = os.path.join(p, "results.json") if os.path.isdir(p) else p
    if not os.path.exists(f):
      raise FileNotFoundError(f"{f} does not exist: pass workdirs of finished runs")
    with open(f) as fh:
      out.append(json.load(fh))
  return out


def selection_metric(run):
  """The task's selection metric (its first), from the task registry."""
  try:
    return tasks.get(run["task"]).metrics[0]
  except (KeyError, ValueError):
    return tasks.Metric("accuracy")


def _pm(metric, xs) -> str:
  """mean ± sample std (ddof=1) in the metric's own unit (% for rates) and decimals."""
  scale = 100 if metric.percent else 1
  sd = stats.sample_std(xs)
  return (f"{scale * np.mean(xs):.{metric.decimals}f} ± "
          + (f"{scale * sd:.{metric.decimals}f}" if np.isfinite(sd) else "–"))


def _share(xs) -> str:
  xs = 100 * np.asarray(xs, float)
  if not np.isfinite(xs).any():
    return "–"
  sd = stats.sample_std(xs)
  return f"{np.nanmean(xs):.0f}% ± " + (f"{sd:.0f}" if np.isfinite(sd) else "–")


def table(runs) -> str:
  names = list(dict.fromkeys(n for r in runs for n in r["methods"]))   # every run's, in order
  metric = selection_metric(runs[0])
  sel = metric.name
  margins = [r["oracle_global_margin"].get("test") for r in runs]
  lines = ([f"{len(runs)} runs; oracle − global margin of {sel} on test devices "
            f"{_pm(metric, margins)}{' points' if metric.percent else ''}.", ""]
           if None not in margins else [f"{len(runs)} runs (no oracle: no margin).", ""])
  head = ["method", f"test {sel}", "closed", f"OOD {sel}", "OOD closed", "labels",
          "backward passes", "cloud backward passes", "device FLOPs", "cloud FLOPs", "uplink B",
          "downlink B"]
  rows = []
  for n in names:
    rs = [r["methods"][n] for r in runs if n in r["methods"]]
    acc = [r["metrics"][sel] for r in rs]
    ood = [r["metrics"].get(sel + "_ood", np.nan) for r in rs]
    closed = [r["metrics"].get("margin_closed", np.nan) for r in rs]
    closed_ood = [r["metrics"].get("margin_closed_ood", np.nan) for r in rs]
    m = rs[0]
    flops = lambda x: "0" if not x else f"{x:.3g}"
    # a row some runs lack (an opt-in variant) says over how many runs its ± is
    label = n if len(rs) == len(runs) else f"{n} ({len(rs)} of {len(runs)} runs)"
    rows.append([label, _pm(metric, acc), _share(closed), _pm(metric, ood), _share(closed_ood),
                 m["labels_used_per_device"], m["device_backward_passes"],
                 m.get("cloud_backward_passes", 0), flops(m.get("device_flops", 0)),
                 flops(m.get("cloud_flops", 0)), f"{m['uplink_bytes']:.0f}",
                 f"{m['downlink_bytes']:.0f}"])
  return "\n".join(lines + tables.table(head, rows) + window_table(runs, metric)
                   + difference_table(runs, metric))


def difference_table(runs, metric) -> list:
  """Per method, method − each reference with its paired 95% interval, pooled over runs."""
  diffs = comparisons.differences(runs, metric.name)
  rivals = sorted({str(comparisons.best_rival(r, metric.name)) for r in runs})
  return (["", f"Differences in {metric.name} (per device, pooled over {len(runs)} runs; mean "
           "[paired bootstrap 95% interval], * excludes 0; best_rival per run: "
           f"{', '.join(rivals)}):", ""] + comparisons.table_lines(diffs, metric))


def window_table(runs, metric) -> list:
  """Stream tasks: the selection metric per window position, mean over runs (test)."""
  w = runs[0].get("window_positions", runs[0].get("windows_per_device"))
  if not w:
    return []
  sel, scale = metric.name, (100 if metric.percent else 1)
  rows = []
  for n in runs[0]["methods"]:
    per = [r["methods"][n]["per_window"][sel] for r in runs
           if "per_window" in r["methods"].get(n, {})]
    if per:
      rows.append([n] + [f"{scale * v:.{metric.decimals}f}" for v in np.mean(per, axis=0)])
  return (["", f"Test {sel} per window position (mean over {len(runs)} runs):", ""]
          + tables.table(["method"] + [f"w{i}" for i in range(w)], rows))


def _data_config(path):
  f = os.path.join(path, "config.json") if os.path.isdir(path) else None
  if not f or not os.path.exists(f):
    return None
  with open(f) as fh:
    return json.load(fh).get("data")


def add_rows(runs, paths, label: str, others) -> None:
  """Run i gets `others[i]`'s global row as method `label`. The runs must share their data
  (the same users in the same order: per-device values are then paired)."""
  if len(others) != len(runs):
    raise ValueError(f"--rows {label}: {len(others)} runs for {len(runs)} main runs; pass one "
                     f"per main run, in the same order")
  for i, (r, o) in enumerate(zip(runs, others)):
    a, b = _data_config(paths[i]), _data_config(o)
    if a is not None and b is not None and a != b:
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise ValueError(f"--rows {label}: {o} was run on other data than {paths[i]} (data keys "
                       f"{diff} differ): its devices cannot be paired")
    row = load([o])[0]["methods"][BASE]
    if len(row["per_device"][selection_metric(r).name]) != len(
        r["methods"][BASE]["per_device"][selection_metric(r).name]):
      raise ValueError(f"--rows {label}: {o} has another number of test devices than {paths[i]}")
    r["methods"][label] = row


def metric_table(runs, names) -> list:
  """Mean ± sample std over runs of each metric (test, and OOD where there is a group), and
  each per-device metric's paired intervals against the references."""
  ms = {m.name: m for m in tasks.get(runs[0]["task"]).metrics}
  unknown = [n for n in names if n not in ms]
  if unknown:
    raise ValueError(f"--metrics {unknown}: the task's metrics are {sorted(ms)}")
  ood = any(r.get("num_ood_devices") for r in runs)
  cols = [(n, "") for n in names] + ([(n, "_ood") for n in names] if ood else [])
  rows = []
  for n in dict.fromkeys(n for r in runs for n in r["methods"]):
    rs = [r["methods"][n] for r in runs if n in r["methods"]]
    rows.append([n] + [_pm(ms[m], [x["metrics"].get(m + s, np.nan) for x in rs])
                       for m, s in cols])
  lines = (["", f"Metrics over {len(runs)} runs (mean ± sample std):", ""]
           + tables.table(["method"] + [f"{n}{' OOD' if s else ''}" for n, s in cols], rows))
  for n in names:
    if n in runs[0]["methods"][BASE]["per_device"]:
      lines += difference_table(runs, ms[n])
  return lines


def main(argv) -> str:
  ap = argparse.ArgumentParser(prog="python -m mmpg_jax.reporting.aggregate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="workdirs of finished runs (or results.json files)")
  ap.add_argument("--metrics", default="", help="comma-separated metrics for a second table")
  ap.add_argument("--rows", action="append", default=[],
                  help="LABEL=DIR,DIR,...: run i's global row from DIR i, named LABEL")
  ap.add_argument("--references", default="",
                  help="comma-separated rows (or best_rival) to compare against, instead of "
                       "the runs' own config.report.references (runs written before "
                       "results.json carried them have none)")
  a = ap.parse_args(argv)
  runs = load(a.runs)
  if a.references:
    for r in runs:
      r["references"] = [x for x in a.references.split(",") if x]
  for spec in a.rows:
    label, _, dirs = spec.partition("=")
    if not label or not dirs:
      raise ValueError(f"--rows {spec!r}: expected LABEL=DIR,DIR,...")
    add_rows(runs, a.runs, label, dirs.split(","))
  out = table(runs)
  if a.metrics:
    out += "\n" + "\n".join(metric_table(runs, [m for m in a.metrics.split(",") if m]))
  deployment = aggregate_deploy.tables(runs)      # where the runs ran the deployment studies
  if deployment:
    out += "\n" + "\n".join(deployment)
  return out


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  print(main(sys.argv[1:]))
