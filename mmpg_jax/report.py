"""What a run leaves behind (DESIGN §6): results.json, report.md and PNG plots.

Driven by the task's metrics: the first (the selection metric) gets the oracle − global margin
and each method's share of it ('closed'); every metric gets a test and an OOD column.
"""
import os

import numpy as np

from mmpg_jax import workdir as wd

SUFFIX = {"test": "", "test_ood": "_ood"}   # metric key suffix of each evaluation group
# Per-device diagnoses kept device by device in results.json (cdc_mmpg.diagnostics).
DIAGNOSIS = ("edit_norm", "code_distance", "fda_prior_tv", "device_prior_tv", "shift_tv",
             "route_wide")


def build_results(cfg, task, evals: dict, method_costs: dict, extra: dict,
                  method_info: dict | None = None) -> dict:
  """evals: Evaluator.run output; method_costs: {name: DeviceCost}; method_info: {name:
  dict} copied as `info` (e.g. an ADR selector and K)."""
  sel = task.selection_metric
  sign = 1.0 if sel.higher_is_better else -1.0
  g = evals["global"]["per_device"]
  o = evals["oracle"]["per_device"] if "oracle" in evals else None
  margin = ({grp: float(o[grp][sel.name].mean() - g[grp][sel.name].mean()) for grp in g}
            if o else {})
  # A pooled metric (e.g. one AUC over every row of every user) is computed from all devices'
  # values at once by the task's function, not averaged over devices.
  pooled = getattr(task, "pooled_metrics", {})
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
        metrics[metric.name + sfx + "_std"] = float(v.std())
        per_device[metric.name + sfx] = [float(a) for a in v]
      if margin.get(grp):
        metrics["margin_closed" + sfx] = float(
            (values[sel.name].mean() - g[grp][sel.name].mean()) / margin[grp])
    for dname, groups in ev.get("diagnostics", {}).items():
      for grp, vals in groups.items():
        metrics[dname + SUFFIX[grp]] = float(np.mean(vals))
        if dname in DIAGNOSIS:
          per_device[dname + SUFFIX[grp]] = [float(a) for a in vals]
    per_window = _per_window(ev, task)
    methods[name] = {"metrics": metrics, "per_device": per_device,
                     **({"per_window": per_window} if per_window else {}),
                     **method_costs[name].as_dict(),
                     "selected_hparams": ev["hp"],
                     f"validation_{sel.name}": sign * float(ev["validation"]),
                     # every grid point's validation score: what the selection chose among
                     **({"validation_grid": [{"hp": h, sel.name: sign * float(s)}
                                             for h, s in zip(ev["grid"], ev["grid_scores"])]}
                        if len(ev.get("grid", ())) > 1 else {}),
                     **({"info": method_info[name]} if method_info and method_info.get(name)
                        else {})}
  # Entries with a `window`: either every device's stream of windows (drifting digits) or one
  # entry per device in a time slice (users arriving over time); positions count either way.
  windows = evals["global"].get("window", {})
  ids = evals["global"].get("device_id", {})
  devices = {grp: (len(np.unique(ids[grp])) if grp in ids else len(g[grp][sel.name]))
             for grp in g}
  positions = max((int(p.max()) + 1 for p in windows.values()), default=1)
  per_device = len(g["test"][sel.name]) // max(devices["test"], 1)
  return {"benchmark": cfg.benchmark, "task": cfg.task,
          "num_eval_devices": devices["test"],
          "num_ood_devices": devices.get("test_ood", 0),
          **({"windows_per_device": per_device} if windows and per_device > 1 else {}),
          **({"window_positions": positions} if windows else {}),
          "oracle_global_margin": margin,
          **extra, "methods": methods}


def _per_window(ev, task) -> dict:
  """{metric + group suffix: [mean over devices at window position 0, 1, ...]} for a stream
  task's method (entries carry their window position); {} otherwise."""
  out = {}
  windows = ev.get("window", {})
  n = max((int(p.max()) + 1 for p in windows.values()), default=0)
  for grp, pos in windows.items():
    for metric in task.metrics:
      if metric.name in getattr(task, "pooled_metrics", {}):
        continue
      v = np.asarray(ev["per_device"][grp][metric.name])
      # a position no entry of this group holds (few users, many time slices) is nan
      out[metric.name + SUFFIX[grp]] = [float(v[pos == w].mean()) if (pos == w).any()
                                        else float("nan") for w in range(n)]
  return out


def ablation_lines(results, task) -> list:
  """Rows a family marks as ablations (info 'ablation'), beside the rows they vary."""
  m = results["methods"]
  rows = [n for n in m if m[n].get("info", {}).get("ablation")]
  if not rows:
    return []
  bases = [n for n in m if n not in rows and any(r.startswith(n + "_") for r in rows)]
  sel = task.selection_metric
  lines = ["## Ablations", "",
           "Each ablation row is trained as its own stage and selected like every other row "
           "(validation devices only), beside the row it varies.", "",
           f"| method | ablation | validation {sel.name} | {sel.name} test | {sel.name} OOD | "
           "downlink B |", "|---|---|---|---|---|---|"]
  for n in bases + rows:
    r, mt = m[n], m[n]["metrics"]
    lines.append(f"| {n} | {r.get('info', {}).get('ablation', '(as configured)')} | "
                 f"{_fmt(sel, r.get(f'validation_{sel.name}', float('nan')))} | "
                 f"{_fmt(sel, mt.get(sel.name, float('nan')))} | "
                 f"{_fmt(sel, mt.get(sel.name + '_ood', float('nan')))} | "
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
        lines.append(f"| {name} | " + " | ".join(_fmt(sel, v) for v in vals) + " |")
    lines.append("")
  return lines


def _fmt_flops(x):
  return "0" if not x else f"{x:.3g}"


def _fmt(metric, x):
  """Rates in %, other metrics (ranks) as they are."""
  if x is None or not np.isfinite(x):
    return "–"
  return f"{100 * x:.{metric.decimals}f}" if metric.percent else f"{x:.{metric.decimals}f}"


def _share(x):
  """A share of the oracle - global margin in %; '–' without an oracle."""
  return "–" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


def write_report(workdir: str, results: dict, cfg, task) -> None:
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
      + (f", {results['windows_per_device']} windows each" if "windows_per_device" in results
         else "") + "; hyper-parameters chosen on "
      f"{cfg.data.num_val_devices} validation devices only, by mean {sel.name}. Device model: "
      f"{results['device_model_bytes']:,} bytes; one inference "
      f"{results['device_inference_flops_per_sample']:.3g} FLOPs.", "",
  ]
  for note in task.report_notes(cfg):
    lines += [note, ""]
  if margin:
    lines += [f"**Oracle − global margin: {_fmt(sel, margin['test'])}{unit} of {sel.name} on "
              f"test devices** ({_fmt(sel, margin.get('test_ood', float('nan')))} on OOD "
              "devices). 'closed' is the share of that margin a method recovers.", ""]
  others = task.metrics[1:]
  head = (f"| method | {sel.name} test | ± std | closed | {sel.name} OOD | OOD closed | "
          + "".join(f"{x.name} test | {x.name} OOD | " for x in others)
          + "labels | backward passes | device FLOPs | cloud FLOPs | uplink B | downlink B | "
          "selected |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for name, r in m.items():
    mt = r["metrics"]
    get = lambda k: mt.get(k, float("nan"))
    row = (f"| {name} | {_fmt(sel, get(sel.name))} | {_fmt(sel, get(sel.name + '_std'))} | "
           f"{_share(get('margin_closed'))} | {_fmt(sel, get(sel.name + '_ood'))} | "
           f"{_share(get('margin_closed_ood'))} | "
           + "".join(f"{_fmt(x, get(x.name))} | {_fmt(x, get(x.name + '_ood'))} | "
                     for x in others)
           + f"{r['labels_used_per_device']} | {r['device_backward_passes']} | "
           f"{_fmt_flops(r['device_flops'])} | {_fmt_flops(r.get('cloud_flops', 0))} | "
           f"{r['uplink_bytes']:.0f} | "
           f"{r['downlink_bytes']:.0f} | {r['selected_hparams']} |")
    lines.append(row)
  lines += ["", "Backward passes count per-sample passes (samples × steps); device FLOPs are the "
            "adaptation's cost from XLA's cost analysis (inference not included); cloud FLOPs "
            "are per-device cloud work beyond generating the edit (cloud-side refinement).", ""]
  anchored = {n: r for n, r in m.items() if "selector" in r.get("info", {})}
  if anchored:
    base = results["device_model_bytes"]
    lines += ["## Anchors (ADR): selector and budget K", "",
              "MMD² between the weighted anchors and all anchor elements of the context (RBF, "
              "median bandwidth; the primary modality), mean over devices. Downlink as a share "
              f"of the device model's {base:,} bytes.", "",
              f"| method | selector | K | uplink B | MMD² test | {sel.name} test | {sel.name} OOD "
              "| downlink B | downlink / model |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(anchored.items(), key=lambda kv: (kv[1]["info"]["selector"],
                                                         kv[1]["info"]["k"])):
      mt = r["metrics"]
      lines.append(f"| {n} | {r['info']['selector']} | {r['info']['k']} | "
                   f"{r['uplink_bytes']:.0f} | {mt.get('anchor_mmd2', float('nan')):.4f} | "
                   f"{_fmt(sel, mt[sel.name])} | "
                   f"{_fmt(sel, mt.get(sel.name + '_ood', float('nan')))} | "
                   f"{r['downlink_bytes']:.0f} | {100 * r['downlink_bytes'] / base:.1f}% |")
    lines.append("")
  lines += window_lines(results, task)
  lines += ablation_lines(results, task)
  lines += robustness_lines(results, task)
  lines += diagnosis_lines(results, task)
  lines += [f"![{p}]({p})" for p in plots]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _gains(results, method, sel, sfx):
  m, g = results["methods"], results["methods"]["global"]
  if method not in m or sel + sfx not in m[method]["per_device"]:
    return None
  return np.asarray(m[method]["per_device"][sel + sfx]) - np.asarray(g["per_device"][sel + sfx])


def diagnosis_lines(results, task) -> list:
  """Where cdc_mmpg's gain comes from, per evaluation group: the edit's size, the distance of
  the device's upload to the meta-training devices (FDA code space), the label-prior errors,
  and how the gain over global follows the distance."""
  m = results["methods"].get("cdc_mmpg")
  if not m or "code_distance" not in m["per_device"]:
    return []
  sel = task.selection_metric
  has_prior = "fda_prior_tv" in m["per_device"]
  header = ("| group | edit norm | code distance | "
            + ("FDA prior TV | device prior TV | true shift TV | " if has_prior else "")
            + "cdc_mmpg gain | fta_k5 gain | corr(cdc gain, distance) | "
              "corr(cdc gain − fta_k5 gain, distance) |")
  lines = ["## Diagnosis: cdc_mmpg on devices near and far from meta-training", "",
           "Per device: the Frobenius norm of the change the edit makes (after the clip); the "
           f"distance of its FDA code to the nearest of {m.get('info', {}).get('reference_devices', 'the')} "
           "meta-training devices' codes, in units of their typical spacing (1 = as close as "
           "meta-training devices are to each other)"
           + ("; the total-variation error against the device's true query label prior of the "
              "FDA's anchor-EM prior and of the device's own EM summary, beside the true shift "
              "(source prior vs truth)" if has_prior else "")
           + f". corr: Pearson correlation over devices of the gain in {sel.name} over global "
             "with the code distance.", "",
           header, "|" + "---|" * (header.count("|") - 1)]
  for grp, sfx in SUFFIX.items():
    pd = m["per_device"]
    if "code_distance" + sfx not in pd:
      continue
    dist = np.asarray(pd["code_distance" + sfx])
    cdc, fta = _gains(results, "cdc_mmpg", sel.name, sfx), _gains(results, "fta_k5", sel.name, sfx)
    corr = lambda a: (float(np.corrcoef(a, dist)[0, 1])
                      if a is not None and len(a) > 2 and a.std() > 0 and dist.std() > 0
                      else float("nan"))
    mean = lambda k: float(np.mean(pd[k + sfx])) if k + sfx in pd else float("nan")
    row = (f"| {grp} | {mean('edit_norm'):.3f} | {dist.mean():.2f} | "
           + (f"{mean('fda_prior_tv'):.3f} | {mean('device_prior_tv'):.3f} | "
              f"{mean('shift_tv'):.3f} | " if has_prior else "")
           + f"{_fmt(sel, cdc.mean())} | "
           + (f"{_fmt(sel, fta.mean())} | " if fta is not None else "– | ")
           + f"{corr(cdc):.2f} | "
           + (f"{corr(cdc - fta):.2f} |" if fta is not None else "– |"))
    lines.append(row)
  return lines + [""]


def robustness_lines(results, task) -> list:
  """cdc_mmpg, its variants and controls (info 'variant') and the forward-only rivals (info
  'rival') side by side, with fta_k5: what holds up out of distribution, at what cost."""
  m = results["methods"]
  rows = [n for n in m if n == "cdc_mmpg" or "variant" in m[n].get("info", {})
          or m[n].get("info", {}).get("rival")]
  if len(rows) < 2:
    return []
  rows += [n for n in ("fta_k5", "global", "oracle") if n in m]
  sel = task.selection_metric
  lines = ["## Beyond the training shifts: variants, controls and forward-only rivals", "",
           "cdc_mmpg_<variant> rows and the controls (mean_edit: the mean meta-training edit for "
           "every device; nearest_edit: the edit of the nearest meta-training device by FDA "
           "code), the forward-only rivals, and fta_k5 (labels + backprop) for reference. Every "
           "row's hyper-parameters, and the choice among rows, are made on validation devices "
           "only. Cloud FLOPs: per-device work beyond generating the edit.", "",
           f"| method | validation {sel.name} | {sel.name} test | {sel.name} OOD | OOD closed | "
           "labels | backward passes | device FLOPs | cloud FLOPs | uplink B | downlink B |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for n in rows:
    r, mt = m[n], m[n]["metrics"]
    lines.append(
        f"| {n} | {_fmt(sel, r.get(f'validation_{sel.name}', float('nan')))} | "
        f"{_fmt(sel, mt.get(sel.name, float('nan')))} | "
        f"{_fmt(sel, mt.get(sel.name + '_ood', float('nan')))} | "
        f"{_share(mt.get('margin_closed_ood', float('nan')))} | "
        f"{r['labels_used_per_device']} | {r['device_backward_passes']} | "
        f"{_fmt_flops(r['device_flops'])} | {_fmt_flops(r.get('cloud_flops', 0))} | "
        f"{r['uplink_bytes']:.0f} | {r['downlink_bytes']:.0f} |")
  return lines + [""] + routing_lines(results, task)


def routing_lines(results, task) -> list:
  """cdc_mmpg_routed: how much weight the router gives the wide FDA per group, and whether the
  devices it leans wide on are those where the wide FDA beats the plain one."""
  m = results["methods"]
  pd = m.get("cdc_mmpg_routed", {}).get("per_device", {})
  if "route_wide" not in pd:
    return []
  sel = task.selection_metric.name
  out = []
  for grp, sfx in SUFFIX.items():
    if "route_wide" + sfx not in pd:
      continue
    w = np.asarray(pd["route_wide" + sfx])
    wide, plain = (_gains(results, n, sel, sfx) for n in ("cdc_mmpg_wide", "cdc_mmpg"))
    diff = wide - plain if wide is not None and plain is not None else None
    corr = (float(np.corrcoef(w, diff)[0, 1]) if diff is not None and len(w) > 2
            and w.std() > 0 and diff.std() > 0 else float("nan"))
    out.append(f"{grp}: mean weight {w.mean():.2f}, {np.mean(w > 0.5):.0%} of devices above "
               f"0.5, corr(weight, wide − plain {sel}) {corr:.2f}")
  return ["cdc_mmpg_routed, the router's weight on the wide FDA's edit per device (sharpness 1, "
          "as trained): " + "; ".join(out) + ".", ""]


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
  sweep = sorted((m[n]["info"]["k"], m[n]["uplink_bytes"], m[n]["metrics"][sel])
                 for n in names if m[n].get("info", {}).get("selector") == "herding")
  if len(sweep) > 1:
    ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "k-", alpha=0.4, zorder=0,
            label="herding, K sweep")
    for k, up, v in sweep:
      ax.annotate(f"K={k}", (up, v), fontsize=6, xytext=(2, -8), textcoords="offset points")
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
  cdc = m.get("cdc_mmpg", {}).get("per_device", {})
  if "code_distance" in cdc:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sfx, marker, grp in (("", "o", "test"), ("_ood", "^", "OOD")):
      if "code_distance" + sfx not in cdc:
        continue
      for method, color in (("cdc_mmpg", "tab:blue"), ("fta_k5", "tab:orange"),
                            ("oracle", "tab:green")):
        gain = _gains(results, method, sel, sfx)
        if gain is not None:
          ax.scatter(cdc["code_distance" + sfx], gain, marker=marker, color=color, s=18,
                     alpha=0.8, label=f"{method}, {grp}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("device's FDA code distance to meta-training devices (typical spacing = 1)")
    ax.set_ylabel(f"gain in {sel} over global")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "gain_vs_code_distance.png"), dpi=100)
    plt.close(fig)
    out.append("gain_vs_code_distance.png")
  return out
