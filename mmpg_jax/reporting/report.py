"""What a run leaves behind: results.json (built by results.py), report.md (the generic
sections of sections.py, the deployment sections, then each family's own) and PNG plots."""
import os

import jax
import numpy as np

from mmpg_jax.core import timing
from mmpg_jax.core import workdir as wd
from mmpg_jax.reporting import deploy_sections
from mmpg_jax.reporting import formats as rf
from mmpg_jax.reporting import plots, sections
from mmpg_jax.reporting.results import build_results  # noqa: F401  (the run's one entry)
from mmpg_jax.reporting.sections import headline_table  # noqa: F401  (printed by main)


def write_report(workdir: str, results: dict, cfg, task, families=()) -> None:
  """results.json, report.md and the plots; `families`: the method family modules, whose
  optional `report_lines(results, task, workdir)` add their own sections."""
  # Method order (baselines, then a family and its ablations) is kept: it is the table's order.
  wd.write_json(os.path.join(workdir, "results.json"), results, sort_keys=False)
  pngs = write_plots(workdir, results, task)
  sel = task.selection_metric
  lines = intro_lines(results, cfg, task) + sections.main_table(results, task)
  lines += ["", "± std is the sample standard deviation over devices. Backward passes count "
            "per-sample passes (samples × steps) on the device; cloud backward passes those the "
            "cloud runs on data a device uploaded; device FLOPs are the "
            "adaptation's cost from XLA's cost analysis (inference not included); cloud FLOPs "
            "are per-device cloud work beyond generating the edit (cloud-side refinement).", ""]
  lines += sections.ood_choice_lines(results, sel)
  lines += sections.difference_lines(results, sel)
  lines += sections.seen_lines(results)
  lines += sections.window_lines(results, task)
  lines += sections.ablation_lines(results, task)
  lines += sections.curve_lines(results)
  lines += deploy_sections.lines(results, task)
  for family in families:
    report_lines = getattr(family, "report_lines", None)    # optional for a family module
    if report_lines is not None:
      lines += report_lines(results, task, workdir)
  lines += [f"![{p}]({p})" for p in pngs]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def write_time_table(workdir: str, rows, wall: float, what: str) -> None:
  """Appends where `what` spent its wall time to report.md (results.json never holds times: a
  run's bytes are a function of its seed, not of the machine)."""
  lines = ["", "## Where the time went", "",
           f"Wall time of {what}: {wall:.0f} s on {jax.default_backend()} "
           f"({jax.device_count()} device(s), {os.cpu_count()} host cores). A stage's time "
           "includes the stages nested under it; nested stages under 0.5% of the wall are not "
           "shown. Times are this machine's: compare them only with runs on the same one.", ""]
  with open(os.path.join(workdir, "report.md"), "a") as f:
    f.write("\n".join(lines + timing.table_lines(rows)) + "\n")


def intro_lines(results, cfg, task) -> list:
  """The title, the devices and the model, the task's notes and the oracle − global margin."""
  sel = task.selection_metric
  margin = results["oracle_global_margin"]
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
  return lines


def write_plots(workdir: str, results: dict, task) -> list:
  """per_device_<metric>.png, <metric>_vs_uplink.png, the validation curves and the
  deployment figures; returns their file names."""
  sel = task.selection_metric.name
  m = results["methods"]
  names = list(m)
  with plots.figure(os.path.join(workdir, f"per_device_{sel}.png"), 1, 2, (12, 4),
                    sharey=True) as (_, axes):
    for ax, key, title in zip(axes[0], (sel, sel + "_ood"), ("test devices", "OOD devices")):
      data = [m[n]["per_device"].get(key, []) for n in names]
      ax.boxplot([d if d else [np.nan] for d in data], showmeans=True)
      ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
      ax.set_title(f"per-device {sel}, {title}")
      ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(sel)
  with plots.figure(os.path.join(workdir, f"{sel}_vs_uplink.png")) as (_, axes):
    ax = axes[0, 0]
    import matplotlib.pyplot as plt
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for n in names:
      ax.scatter(max(m[n]["uplink_bytes"], 1.0), m[n]["metrics"][sel], label=n, s=18)
    ax.set_xscale("log")
    ax.set_xlabel("uplink bytes per device (0 plotted at 1)")
    ax.set_ylabel(f"test {sel}")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
  out = [f"per_device_{sel}.png", f"{sel}_vs_uplink.png"]
  return out + write_curve_plot(workdir, results, task) + deploy_sections.write_plots(
      workdir, results, task)


def write_curve_plot(workdir: str, results: dict, task) -> list:
  """validation_curves.png: each stage's validation curve and the step it kept."""
  curves = {k: c for k, c in (results.get("training_curves") or {}).items() if c["curve"]["step"]}
  if not curves:
    return []
  with plots.figure(os.path.join(workdir, "validation_curves.png"), 1, len(curves),
                    (5 * len(curves), 3.6)) as (_, axes):
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
  return ["validation_curves.png"]
