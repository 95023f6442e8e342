"""What a run leaves behind (DESIGN §6): results.json, report.md and PNG plots."""
import os

import numpy as np

from mmpg_jax import workdir as wd

GROUPS = {"test": "accuracy", "test_ood": "accuracy_ood"}


def build_results(cfg, evals: dict, method_costs: dict, extra: dict,
                  method_info: dict | None = None) -> dict:
  """evals: Evaluator.run output; method_costs: {name: DeviceCost}; method_info: {name:
  dict} copied as `info` (e.g. an ADR selector and K)."""
  g = evals["global"]["per_device"]
  o = evals["oracle"]["per_device"] if "oracle" in evals else None
  margin = {grp: float(o[grp].mean() - g[grp].mean()) for grp in g} if o else {}
  methods = {}
  for name, ev in evals.items():
    metrics, per_device = {}, {}
    for grp, accs in ev["per_device"].items():
      key = GROUPS[grp]
      metrics[key] = float(accs.mean())
      metrics[key + "_std"] = float(accs.std())
      per_device[key] = [float(a) for a in accs]
      if margin.get(grp):
        metrics["margin_closed" + key[len("accuracy"):]] = float(
            (accs.mean() - g[grp].mean()) / margin[grp])
    for dname, groups in ev.get("diagnostics", {}).items():
      for grp, vals in groups.items():
        metrics[dname + GROUPS[grp][len("accuracy"):]] = float(np.mean(vals))
    methods[name] = {"metrics": metrics, "per_device": per_device,
                     **method_costs[name].as_dict(),
                     "selected_hparams": ev["hp"],
                     "validation_accuracy": float(ev["validation"]),
                     **({"info": method_info[name]} if method_info and method_info.get(name)
                        else {})}
  return {"benchmark": cfg.benchmark, "task": cfg.task,
          "num_eval_devices": len(g["test"]),
          "num_ood_devices": len(g.get("test_ood", [])),
          "oracle_global_margin": margin,
          **extra, "methods": methods}


def _fmt_flops(x):
  return "0" if not x else f"{x:.3g}"


def write_report(workdir: str, results: dict, cfg) -> None:
  # Method order (baselines, then CDC-MMPG and its ablations) is kept: it is the table's order.
  wd.write_json(os.path.join(workdir, "results.json"), results, sort_keys=False)
  plots = write_plots(workdir, results)
  m = results["methods"]
  margin = results["oracle_global_margin"]
  lines = [
      f"# {results['benchmark']} ({results['task']})", "",
      f"{results['num_eval_devices']} test devices, {results['num_ood_devices']} "
      f"out-of-distribution devices; hyper-parameters chosen on "
      f"{cfg.data.num_val_devices} validation devices only. Device model: "
      f"{results['device_model_bytes']:,} bytes; one inference "
      f"{results['device_inference_flops_per_sample']:.3g} FLOPs.", "",
  ]
  if margin:
    lines += [f"**Oracle − global margin: {100 * margin['test']:.2f} accuracy points on test "
              f"devices** ({100 * margin.get('test_ood', float('nan')):.2f} on OOD devices). "
              "'closed' is the share of that margin a method recovers.", ""]
  lines += ["| method | test acc | ± std | closed | OOD acc | OOD closed | labels | backward "
            "passes | device FLOPs | uplink B | downlink B | selected |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in m.items():
    mt = r["metrics"]
    lines.append(
        f"| {name} | {100 * mt['accuracy']:.2f} | {100 * mt['accuracy_std']:.1f} | "
        f"{100 * mt.get('margin_closed', float('nan')):.0f}% | "
        f"{100 * mt.get('accuracy_ood', float('nan')):.2f} | "
        f"{100 * mt.get('margin_closed_ood', float('nan')):.0f}% | "
        f"{r['labels_used_per_device']} | {r['device_backward_passes']} | "
        f"{_fmt_flops(r['device_flops'])} | {r['uplink_bytes']:.0f} | {r['downlink_bytes']:.0f} | "
        f"{r['selected_hparams']} |")
  lines += ["", "Backward passes count per-sample passes (samples × steps); device FLOPs are the "
            "adaptation's cost from XLA's cost analysis (inference not included).", ""]
  anchored = {n: r for n, r in m.items() if "selector" in r.get("info", {})}
  if anchored:
    base = results["device_model_bytes"]
    lines += ["## Anchors (ADR): selector and budget K", "",
              "MMD² between the weighted anchors and all frame elements of the context (RBF, "
              "median bandwidth), mean over devices. Downlink as a share of the device model's "
              f"{base:,} bytes.", "",
              "| method | selector | K | uplink B | MMD² test | test acc | OOD acc | downlink B "
              "| downlink / model |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(anchored.items(), key=lambda kv: (kv[1]["info"]["selector"],
                                                         kv[1]["info"]["k"])):
      mt = r["metrics"]
      lines.append(f"| {n} | {r['info']['selector']} | {r['info']['k']} | "
                   f"{r['uplink_bytes']:.0f} | {mt.get('anchor_mmd2', float('nan')):.4f} | "
                   f"{100 * mt['accuracy']:.2f} | {100 * mt.get('accuracy_ood', float('nan')):.2f}"
                   f" | {r['downlink_bytes']:.0f} | {100 * r['downlink_bytes'] / base:.1f}% |")
    lines.append("")
  lines += [f"![{p}]({p})" for p in plots]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plots(workdir: str, results: dict) -> list:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results["methods"])
  m = results["methods"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
  for ax, key, title in zip(axes, ("accuracy", "accuracy_ood"), ("test devices", "OOD devices")):
    data = [m[n]["per_device"].get(key, []) for n in names]
    ax.boxplot([d if d else [np.nan] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
    ax.set_title(f"per-device accuracy, {title}")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "per_device_accuracy.png"), dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.set_prop_cycle(color=plt.cm.tab20.colors)
  sweep = sorted((m[n]["info"]["k"], m[n]["uplink_bytes"], m[n]["metrics"]["accuracy"])
                 for n in names if m[n].get("info", {}).get("selector") == "herding")
  if len(sweep) > 1:
    ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "k-", alpha=0.4, zorder=0,
            label="herding, K sweep")
    for k, up, acc in sweep:
      ax.annotate(f"K={k}", (up, acc), fontsize=6, xytext=(2, -8), textcoords="offset points")
  for n in names:
    up = m[n]["uplink_bytes"]
    ax.scatter(max(up, 1.0), m[n]["metrics"]["accuracy"], label=n, s=18)
  ax.set_xscale("log")
  ax.set_xlabel("uplink bytes per device (0 plotted at 1)")
  ax.set_ylabel("test accuracy")
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy_vs_uplink.png"), dpi=100)
  plt.close(fig)
  return ["per_device_accuracy.png", "accuracy_vs_uplink.png"]
