"""results.json: every evaluated row's metrics (mean, std and per device, per group), its
costs, its typed protocol facts and selection, and the run's comparisons.

Driven by the task's metrics: the first (the selection metric) gets the oracle − global margin
and each row's share of it ('closed'); every metric gets a test and an OOD value. Nothing
time- or host-dependent goes in: the same seed gives the same bytes.
"""
import numpy as np

from mmpg_jax.core.protocol import BASE, ORACLE
from mmpg_jax.reporting import comparisons, deploy_sections, stats
from mmpg_jax.reporting.formats import SUFFIX
from mmpg_jax.tasks import capabilities


def build_results(cfg, task, evals: dict, method_costs: dict, extra: dict,
                  methods=()) -> dict:
  """evals: Evaluator.run output; method_costs: {name: DeviceCost}; methods: the evaluated
  `Method`s, whose protocol facts (role, ablation_of, seen, family) and `info` go into each
  row and whose `per_device_diagnostics` are kept device by device beside their mean."""
  by_name = {m.name: m for m in methods}
  sel = task.selection_metric
  g = evals[BASE]["per_device"]
  o = evals[ORACLE]["per_device"] if ORACLE in evals else None
  margin = ({grp: float(o[grp][sel.name].mean() - g[grp][sel.name].mean()) for grp in g}
            if o else {})
  rows = {name: row(task, ev, method_costs[name], by_name.get(name), g, margin)
          for name, ev in evals.items()}
  out = {"benchmark": cfg.benchmark, "task": cfg.task, **device_counts(evals[BASE], sel),
         "oracle_global_margin": margin,
         # the rows every method is compared against (config.report.references)
         "references": list(cfg.report.references),
         **extra, "methods": rows}
  out["frontier"] = deploy_sections.frontier(out, task, int(cfg.data.query_size))
  out["best_rival"] = comparisons.best_rival(out, sel.name)
  choice = comparisons.ood_choice(out, sel.name, tuple(cfg.report.ood_rows))
  if choice:
    out["ood_choice"] = choice
  out["differences"] = {ref: {n: {grp: list(iv) for grp, iv in d.items()}
                              for n, d in per.items()}
                        for ref, per in comparisons.differences([out], sel.name).items()}
  return out


def row(task, ev, cost, method, g, margin) -> dict:
  """One row of results.json: metrics, per-device values, costs, selection, protocol facts."""
  sel = task.selection_metric
  sign = 1.0 if sel.higher_is_better else -1.0
  metrics, per_device = row_metrics(task, ev, g, margin)
  kept = method.per_device_diagnostics if method is not None else ()
  for dname, groups in ev.get("diagnostics", {}).items():
    for grp, vals in groups.items():
      metrics[dname + SUFFIX[grp]] = float(np.mean(vals))
      if dname in kept:
        per_device[dname + SUFFIX[grp]] = [float(a) for a in vals]
  per_window = _per_window(ev, task)
  return {"metrics": metrics, "per_device": per_device,
          **({"per_window": per_window} if per_window else {}),
          **cost.as_dict(),
          "selected_hparams": ev["hp"],
          f"validation_{sel.name}": sign * float(ev["validation"]),
          "selected_on": ev.get("selected_on", "validation"),
          # every grid point's validation score: what the selection chose among
          **({"validation_grid": [{"hp": h, sel.name: sign * float(s)}
                                  for h, s in zip(ev["grid"], ev["grid_scores"])]}
             if len(ev.get("grid", ())) > 1 else {}),
          **(method.protocol() if method is not None else {}),
          **({"info": method.info} if method is not None and method.info else {})}


def row_metrics(task, ev, g, margin):
  """({metric + group suffix: mean, ..._std, margin_closed...}, {metric + suffix: [per
  device]}) of one evaluated row; `g` the global row's per-device values."""
  sel = task.selection_metric
  # A pooled metric (e.g. one AUC over every row of every user) is computed from all devices'
  # values at once by the task's function, not averaged over devices.
  pooled = capabilities.pooled_metrics(task)
  metrics, per_device = {}, {}
  for grp, values in ev["per_device"].items():
    sfx = SUFFIX[grp]
    for metric in task.metrics:
      if metric.name in pooled:
        metrics[metric.name + sfx] = float(pooled[metric.name](values))
        continue
      v = values[metric.name]
      metrics[metric.name + sfx] = float(v.mean())
      metrics[metric.name + sfx + "_std"] = stats.sample_std(v)     # over devices
      per_device[metric.name + sfx] = [float(a) for a in v]
    if margin.get(grp):
      metrics["margin_closed" + sfx] = float(
          (values[sel.name].mean() - g[grp][sel.name].mean()) / margin[grp])
  return metrics, per_device


def device_counts(global_ev, sel) -> dict:
  """Devices per group, and the stream layout where entries carry a `window`: either every
  device's stream of windows (drifting digits) or one entry per device in a time slice
  (users arriving over time); positions count either way."""
  g = global_ev["per_device"]
  windows = global_ev.get("window", {})
  ids = global_ev.get("device_id", {})
  devices = {grp: (len(np.unique(ids[grp])) if grp in ids else len(g[grp][sel.name]))
             for grp in g}
  positions = max((int(p.max()) + 1 for p in windows.values()), default=1)
  per_device = len(g["test"][sel.name]) // max(devices["test"], 1)
  return {"num_eval_devices": devices["test"],
          "num_ood_devices": devices.get("test_ood", 0),
          "num_val_ood_devices": devices.get("val_ood", 0),
          **({"windows_per_device": per_device} if windows and per_device > 1 else {}),
          **({"window_positions": positions} if windows else {}),
          # a stream's entries are (device, window) pairs: intervals resample whole devices
          **({"entry_device_ids": {grp: [int(i) for i in v] for grp, v in ids.items()}}
             if ids else {})}


def _per_window(ev, task) -> dict:
  """{metric + group suffix: [mean over devices at window position 0, 1, ...]} for a stream
  task's method (entries carry their window position); {} otherwise."""
  out = {}
  windows = ev.get("window", {})
  n = max((int(p.max()) + 1 for p in windows.values()), default=0)
  for grp, pos in windows.items():
    for metric in task.metrics:
      if metric.name in capabilities.pooled_metrics(task):
        continue
      v = np.asarray(ev["per_device"][grp][metric.name])
      # a position no entry of this group holds (few users, many time slices) is nan
      out[metric.name + SUFFIX[grp]] = [float(v[pos == w].mean()) if (pos == w).any()
                                        else float("nan") for w in range(n)]
  return out
