"""What a run leaves behind: results.json, report.md and PNG plots.

Driven by the task's metrics: the first (the selection metric) gets the oracle − global margin
and each method's share of it ('closed'); every metric gets a test and an OOD column.
"""
import os

import numpy as np

from mmpg_jax import comparisons, report_deploy
from mmpg_jax import report_format as rf
from mmpg_jax import stats
from mmpg_jax import workdir as wd
from mmpg_jax.report_format import SUFFIX
from mmpg_jax.tasks import capabilities


def build_results(cfg, task, evals: dict, method_costs: dict, extra: dict,
                  methods=()) -> dict:
  """evals: Evaluator.run output; method_costs: {name: DeviceCost}; methods: the evaluated
  `Method`s, whose protocol facts (role, ablation_of, seen, family) and `info` go into each
  row and whose `per_device_diagnostics` are kept device by device beside their mean."""
  by_name = {m.name: m for m in methods}
  per_device_diagnostics = {m.name: m.per_device_diagnostics for m in methods}
  sel = task.selection_metric
  sign = 1.0 if sel.higher_is_better else -1.0
  g = evals["global"]["per_device"]
  o = evals["oracle"]["per_device"] if "oracle" in evals else None
  margin = ({grp: float(o[grp][sel.name].mean() - g[grp][sel.name].mean()) for grp in g}
            if o else {})
  # A pooled metric (e.g. one AUC over every row of every user) is computed from all devices'
  # values at once by the task's function, not averaged over devices.
  pooled = capabilities.pooled_metrics(task)
  methods = {}
  for name, ev in evals.items():
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
    for dname, groups in ev.get("diagnostics", {}).items():
      for grp, vals in groups.items():
        metrics[dname + SUFFIX[grp]] = float(np.mean(vals))
        if dname in per_device_diagnostics.get(name, ()):
          per_device[dname + SUFFIX[grp]] = [float(a) for a in vals]
    per_window = _per_window(ev, task)
    methods[name] = {"metrics": metrics, "per_device": per_device,
                     **({"per_window": per_window} if per_window else {}),
                     **method_costs[name].as_dict(),
                     "selected_hparams": ev["hp"],
                     f"validation_{sel.name}": sign * float(ev["validation"]),
                     "selected_on": ev.get("selected_on", "validation"),
                     # every grid point's validation score: what the selection chose among
                     **({"validation_grid": [{"hp": h, sel.name: sign * float(s)}
                                             for h, s in zip(ev["grid"], ev["grid_scores"])]}
                        if len(ev.get("grid", ())) > 1 else {}),
                     **(by_name[name].protocol() if name in by_name else {}),
                     **({"info": by_name[name].info} if name in by_name and by_name[name].info
                        else {})}
  # Entries with a `window`: either every device's stream of windows (drifting digits) or one
  # entry per device in a time slice (users arriving over time); positions count either way.
  windows = evals["global"].get("window", {})
  ids = evals["global"].get("device_id", {})
  devices = {grp: (len(np.unique(ids[grp])) if grp in ids else len(g[grp][sel.name]))
             for grp in g}
  positions = max((int(p.max()) + 1 for p in windows.values()), default=1)
  per_device = len(g["test"][sel.name]) // max(devices["test"], 1)
  out = {"benchmark": cfg.benchmark, "task": cfg.task,
         "num_eval_devices": devices["test"],
         "num_ood_devices": devices.get("test_ood", 0),
         "num_val_ood_devices": devices.get("val_ood", 0),
         **({"windows_per_device": per_device} if windows and per_device > 1 else {}),
         **({"window_positions": positions} if windows else {}),
         # a stream's entries are (device, window) pairs: intervals resample whole devices
         **({"entry_device_ids": {grp: [int(i) for i in v] for grp, v in ids.items()}}
            if ids else {}),
         "oracle_global_margin": margin,
         # the rows every method is compared against (config.report.references)
         "references": list(cfg.report.references),
         **extra, "methods": methods}
  out["frontier"] = report_deploy.frontier(out, task, int(cfg.data.query_size))
  out["best_rival"] = comparisons.best_rival(out, sel.name)
  choice = comparisons.ood_choice(out, sel.name, tuple(cfg.report.ood_rows))
  if choice:
    out["ood_choice"] = choice
  out["differences"] = {ref: {n: {grp: list(iv) for grp, iv in d.items()}
                              for n, d in per.items()}
                        for ref, per in comparisons.differences([out], sel.name).items()}
  return out


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


def ablation_lines(results, task) -> list:
  """Rows of role "ablation", beside the rows they vary (`ablation_of`)."""
  m = results["methods"]
  rows = [n for n in m if m[n].get("role") == "ablation"]
  if not rows:
    return []
  bases = [n for n in m if n not in rows and any(m[r].get("ablation_of") == n for r in rows)]
  sel = task.selection_metric
  lines = ["## Ablations", "",
           "Each ablation row is trained as its own stage and selected like every other row "
           "(validation devices only), beside the row it varies.", "",
           f"| method | ablation | validation {sel.name} | {sel.name} test | {sel.name} OOD | "
           "downlink B |", "|---|---|---|---|---|---|"]
  for n in bases + rows:
    r, mt = m[n], m[n]["metrics"]
    lines.append(f"| {n} | {r.get('varies') or '(as configured)'} | "
                 f"{rf.fmt(sel, r.get(f'validation_{sel.name}', float('nan')))} | "
                 f"{rf.fmt(sel, mt.get(sel.name, float('nan')))} | "
                 f"{rf.fmt(sel, mt.get(sel.name + '_ood', float('nan')))} | "
                 f"{r['downlink_bytes']:.0f} |")
  return lines + [""]


def window_lines(results, task) -> list:
  """Who follows the drift: the selection metric per window position, test and OOD."""
  m = results["methods"]
  w = results.get("window_positions", results.get("windows_per_device"))
  if not w:
    return []
  sel = task.selection_metric
  lines = ["## Per window position", "", task.window_note.format(metric=sel.name), ""]
  for grp, sfx in SUFFIX.items():
    key = sel.name + sfx
    if key not in m["global"].get("per_window", {}):
      continue
    head = f"| method ({grp}) | " + " | ".join(f"w{i}" for i in range(w)) + " |"
    lines += [head, "|" + "---|" * (w + 1)]
    for name, r in m.items():
      vals = r.get("per_window", {}).get(key)
      if vals:
        lines.append(f"| {name} | " + " | ".join(rf.fmt(sel, v) for v in vals) + " |")
    lines.append("")
  return lines


def ood_choice_lines(results, sel) -> list:
  """The OOD claim as validation makes it: the robustness row chosen on val_ood devices."""
  c = results.get("ood_choice")
  if not c:
    return []
  plain = ", ".join(f"plain {n} {rf.fmt(sel, v)}" for n, v in c.get("plain", {}).items()
                    if v is not None)
  return [f"**Out of distribution, as validation chooses:** among {', '.join(c['candidates'])} "
          f"(each robustness variant's grid chosen on the {results['num_val_ood_devices']} "
          f"validation OOD devices, a shift family disjoint from the test OOD group's), "
          f"validation OOD ranks "
          f"**{c['row']}** first ({rf.fmt(sel, c['val_ood'])}); its test OOD {sel.name} is "
          f"**{rf.fmt(sel, c['test_ood'])}**" + (f" ({plain})" if plain else "") + ". That is the "
          "figure to quote for out-of-distribution devices; any other row's test OOD figure "
          "was not chosen blind.", ""]


def seen_lines(results) -> list:
  """What each row saw: the device's labels, the labelled meta devices behind it (meta-training
  or a control's training) and their shift families, and where it departs from its paper."""
  m = results["methods"]
  lines = ["## What each row saw", "",
           "Labels: per device, from its own data. Meta devices: labelled simulated devices the "
           "cloud trained this row on (never the evaluated devices); shifts: the families those "
           "devices were drawn from ('training': the global model's ranges).", "",
           "| method | device labels | meta devices | shifts | note |", "|---|---|---|---|---|"]
  for n, r in m.items():
    seen = r.get("seen", {})
    lines.append(f"| {n} | {r['labels_used_per_device']} | {seen.get('meta_devices', 0)} | "
                 f"{seen.get('shifts', '–')} | {seen.get('note', '')} |")
  return lines + [""]


def difference_lines(results, sel) -> list:
  """The paired differences against the references (config.report.references), with
  intervals."""
  diffs = results.get("differences") or {}
  if not diffs:
    return []
  rival = results.get("best_rival")
  return (["## Differences with paired 95% intervals", "",
           f"Per device, method − reference in {sel.name}; mean [95% paired bootstrap interval "
           f"over devices]; * marks an interval that excludes 0. `best_rival` is the forward-only "
           f"rival validation ranks first ({rival or 'none in this run'}).", ""]
          + comparisons.table_lines(diffs, sel) + [""])


def curve_lines(results) -> list:
  """The validation curves of the stages that recorded one (the global model with
  `train.eval_every`, DUET's generator): where each stopped and why."""
  curves = results.get("training_curves") or {}
  if not curves:
    return []
  lines = ["## Validation curves", "",
           "Each stage scored on the validation devices as it trains; the step it keeps is the "
           "best-scoring one (test devices are never read for this). "
           "validation_curves.png plots them.", "",
           "| stage | metric | evaluated every | steps | kept step | val at kept step | val at "
           "last step | curve (step: value) |", "|---|---|---|---|---|---|---|---|"]
  for stage, c in curves.items():
    metric, pts = c["metric"], c["curve"]
    steps, vals = pts["step"], pts[metric]
    if not steps:
      continue
    kept = steps.index(c["best_step"]) if c["best_step"] in steps else int(np.argmax(vals))
    every = steps[1] - steps[0] if len(steps) > 1 else steps[0]
    shown = ", ".join(f"{s}: {v:.4f}" for s, v in zip(steps, vals))
    lines.append(f"| {stage} | {metric} | {every} | {c['steps']} | {steps[kept]} | "
                 f"{vals[kept]:.4f} | {vals[-1]:.4f} | {shown} |")
  return lines + [""]


def write_curve_plot(workdir: str, results: dict, task) -> list:
  curves = {k: c for k, c in (results.get("training_curves") or {}).items() if c["curve"]["step"]}
  if not curves:
    return []
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
  for ax, (stage, c) in zip(axes[0], curves.items()):
    metric, pts = c["metric"], c["curve"]
    extra = [k for k in (task.curve_metric,) if k in pts and k != metric]
    ax.plot(pts["step"], pts[metric], "o-", ms=3, label=f"val {metric}")
    ax.axvline(c["best_step"], color="k", ls="--", lw=0.8, label=f"kept: step {c['best_step']}")
    if extra:                         # the task's second metric, on its own axis
      ax2 = ax.twinx()
      ax2.plot(pts["step"], pts[extra[0]], "s-", ms=3, color="tab:orange",
               label=f"val {extra[0]}")
      ax2.set_ylabel(extra[0])
      ax2.legend(fontsize=7, loc="lower right")
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "validation_curves.png"), dpi=100)
  plt.close(fig)
  return ["validation_curves.png"]


def headline_table(results: dict, task) -> list:
  """The compact table the main job prints when it ends: per method the selection metric on
  test and OOD devices, the share of the oracle − global margin it closes, and what a device
  pays (labels, backward passes, bytes up and down). A run without an oracle, an OOD group
  (seqrec's official protocol) or a validation OOD group leaves those columns out."""
  sel = task.selection_metric
  fmt = lambda key: lambda mt: rf.fmt(sel, mt.get(key, float("nan")))
  share = lambda key: lambda mt: rf.share(mt.get(key, float("nan")))
  margin = bool(results.get("oracle_global_margin", True))     # no oracle: nothing closed
  cols = [(f"{sel.name} test", fmt(sel.name))] + ([("closed", share("margin_closed"))]
                                                   if margin else [])
  if results.get("num_ood_devices", 1):
    cols += [(f"{sel.name} OOD", fmt(sel.name + "_ood"))] + (
        [("OOD closed", share("margin_closed_ood"))] if margin else [])
  if results.get("num_val_ood_devices", 1):
    cols += [("val OOD", fmt(sel.name + "_val_ood"))]
  head = ("| method | " + " | ".join(c for c, _ in cols) + " | labels | backward passes | "
          "cloud backward passes | uplink B | downlink B |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for name, r in results["methods"].items():
    mt = r["metrics"]
    lines.append(f"| {name} | " + " | ".join(f(mt) for _, f in cols) + " | "
                 f"{r['labels_used_per_device']} | "
                 f"{r['device_backward_passes']} | {r.get('cloud_backward_passes', 0)} | "
                 f"{r['uplink_bytes']:.0f} | "
                 f"{r['downlink_bytes']:.0f} |")
  return lines


def write_report(workdir: str, results: dict, cfg, task, families=()) -> None:
  """results.json, report.md and the plots; `families`: the method family modules, whose
  optional `report_lines(results, task, workdir)` add their own sections."""
  # Method order (baselines, then a family and its ablations) is kept: it is the table's order.
  wd.write_json(os.path.join(workdir, "results.json"), results, sort_keys=False)
  plots = write_plots(workdir, results, task)
  m = results["methods"]
  margin = results["oracle_global_margin"]
  sel = task.selection_metric
  unit = " points" if sel.percent else ""
  lines = [
      f"# {results['benchmark']} ({results['task']})", "",
      f"{results['num_eval_devices']} test devices, {results['num_ood_devices']} "
      f"out-of-distribution devices"
      + (f", {results['num_val_ood_devices']} validation OOD devices (a held-out shift family "
         "of their own, where robustness choices are made)"
         if results.get("num_val_ood_devices") else "")
      + (f", {results['windows_per_device']} windows each" if "windows_per_device" in results
         else "") + "; hyper-parameters chosen on "
      f"{cfg.data.num_val_devices} validation devices only, by mean {sel.name}. Device model: "
      f"{results['device_model_bytes']:,} bytes; one inference "
      f"{results['device_inference_flops_per_sample']:.3g} FLOPs.", "",
  ]
  for note in task.report_notes(cfg):
    lines += [note, ""]
  if margin:
    lines += [f"**Oracle − global margin: {rf.fmt(sel, margin['test'])}{unit} of {sel.name} on "
              f"test devices** ({rf.fmt(sel, margin.get('test_ood', float('nan')))} on OOD "
              "devices). 'closed' is the share of that margin a method recovers.", ""]
  others = task.metrics[1:]
  head = (f"| method | {sel.name} test | ± std | closed | {sel.name} OOD | OOD closed | "
          f"{sel.name} val OOD | selected on | "
          + "".join(f"{x.name} test | {x.name} OOD | " for x in others)
          + "labels | backward passes | cloud backward passes | device FLOPs | cloud FLOPs | "
          "uplink B | downlink B | selected |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for name, r in m.items():
    mt = r["metrics"]
    get = lambda k: mt.get(k, float("nan"))
    row = (f"| {name} | {rf.fmt(sel, get(sel.name))} | {rf.fmt(sel, get(sel.name + '_std'))} | "
           f"{rf.share(get('margin_closed'))} | {rf.fmt(sel, get(sel.name + '_ood'))} | "
           f"{rf.share(get('margin_closed_ood'))} | {rf.fmt(sel, get(sel.name + '_val_ood'))} | "
           f"{r.get('selected_on', 'validation')} | "
           + "".join(f"{rf.fmt(x, get(x.name))} | {rf.fmt(x, get(x.name + '_ood'))} | "
                     for x in others)
           + f"{r['labels_used_per_device']} | {r['device_backward_passes']} | "
           f"{r.get('cloud_backward_passes', 0)} | {rf.fmt_flops(r['device_flops'])} | "
           f"{rf.fmt_flops(r.get('cloud_flops', 0))} | "
           f"{r['uplink_bytes']:.0f} | "
           f"{r['downlink_bytes']:.0f} | {r['selected_hparams']} |")
    lines.append(row)
  lines += ["", "± std is the sample standard deviation over devices. Backward passes count "
            "per-sample passes (samples × steps) on the device; cloud backward passes those the "
            "cloud runs on data a device uploaded; device FLOPs are the "
            "adaptation's cost from XLA's cost analysis (inference not included); cloud FLOPs "
            "are per-device cloud work beyond generating the edit (cloud-side refinement).", ""]
  lines += ood_choice_lines(results, sel)
  lines += difference_lines(results, sel)
  lines += seen_lines(results)
  lines += window_lines(results, task)
  lines += ablation_lines(results, task)
  lines += curve_lines(results)
  lines += report_deploy.lines(results, task)
  for family in families:
    if hasattr(family, "report_lines"):
      lines += family.report_lines(results, task, workdir)
  lines += [f"![{p}]({p})" for p in plots]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plots(workdir: str, results: dict, task) -> list:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sel = task.selection_metric.name
  names = list(results["methods"])
  m = results["methods"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
  for ax, key, title in zip(axes, (sel, sel + "_ood"), ("test devices", "OOD devices")):
    data = [m[n]["per_device"].get(key, []) for n in names]
    ax.boxplot([d if d else [np.nan] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
    ax.set_title(f"per-device {sel}, {title}")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(sel)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, f"per_device_{sel}.png"), dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.set_prop_cycle(color=plt.cm.tab20.colors)
  for n in names:
    ax.scatter(max(m[n]["uplink_bytes"], 1.0), m[n]["metrics"][sel], label=n, s=18)
  ax.set_xscale("log")
  ax.set_xlabel("uplink bytes per device (0 plotted at 1)")
  ax.set_ylabel(f"test {sel}")
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, f"{sel}_vs_uplink.png"), dpi=100)
  plt.close(fig)
  out = [f"per_device_{sel}.png", f"{sel}_vs_uplink.png"]
  return out + write_curve_plot(workdir, results, task) + report_deploy.write_plots(
      workdir, results, task)
