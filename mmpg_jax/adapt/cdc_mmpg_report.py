"""The cdc_mmpg family's sections of report.md: the anchors it sends (ADR selector and K, with
the K sweep plotted), and where its gain comes from (the per-device diagnosis)."""
import os

import numpy as np

from mmpg_jax.reporting import formats as rf
from mmpg_jax.reporting import plots, tables


def diagnosis_lines(results, task) -> list:
  """Where cdc_mmpg's gain comes from, per evaluation group: the edit's size, the distance of
  the device's upload to the meta-training devices (FDA code space), the label-prior errors,
  and how the gain over global follows the distance."""
  m = results["methods"].get("cdc_mmpg")
  if not m or "code_distance" not in m["per_device"]:
    return []
  sel = task.selection_metric
  has_prior = "fda_prior_tv" in m["per_device"]
  head = (["group", "edit norm", "code distance", "nearest training edit / spacing",
           "devices below 1", "nearest training edit / spread"]
          + (["FDA prior TV", "device prior TV", "true shift TV"] if has_prior else [])
          + ["cdc_mmpg gain", "fta_k5 gain", "corr(cdc gain, distance)",
             "corr(cdc gain − fta_k5 gain, distance)"])
  n_ref = m.get("info", {}).get("reference_devices", "the")
  lines = ["## Diagnosis: cdc_mmpg on devices near and far from meta-training", "",
           "Per device: the Frobenius norm of the change the edit makes (after the clip); the "
           f"distance of its FDA code to the nearest of {n_ref} "
           "meta-training devices' codes, in units of their typical spacing (1 = as close as "
           "meta-training devices are to each other)"
           + ("; the total-variation error against the device's true query label prior of the "
              "FDA's anchor-EM prior and of the device's own EM summary, beside the true shift "
              "(source prior vs truth)" if has_prior else "")
           + f". corr: Pearson correlation over devices of the gain in {sel.name} over global "
             "with the code distance. Memorisation (does the FDA hand out its training "
             "devices' edits?): the distance of each device's applied edit to the nearest "
             "meta-training device's, in units of the training edits' own nearest-neighbour "
             "spacing ('devices below 1': as close to a training edit as training edits are to "
             "each other) and of their spread (RMS distance to their mean edit).", ""]
  rows = []
  for grp, sfx in rf.SUFFIX.items():
    pd = m["per_device"]
    if "code_distance" + sfx not in pd:
      continue
    dist = np.asarray(pd["code_distance" + sfx])
    cdc = rf.gains(results, "cdc_mmpg", sel.name, sfx)
    fta = rf.gains(results, "fta_k5", sel.name, sfx)
    corr = lambda a: (float(np.corrcoef(a, dist)[0, 1])
                      if a is not None and len(a) > 2 and a.std() > 0 and dist.std() > 0
                      else float("nan"))
    mean = lambda k: float(np.mean(pd[k + sfx])) if k + sfx in pd else float("nan")
    nn = np.asarray(pd.get("edit_nn_distance" + sfx, [np.nan]))
    rows.append([grp, f"{mean('edit_norm'):.3f}", f"{dist.mean():.2f}", f"{nn.mean():.2f}",
                 f"{100 * np.mean(nn < 1):.0f}%", f"{mean('edit_nn_spread'):.2f}"]
                + ([f"{mean(k):.3f}" for k in ("fda_prior_tv", "device_prior_tv", "shift_tv")]
                   if has_prior else [])
                + [rf.fmt(sel, cdc.mean()),
                   rf.fmt(sel, fta.mean()) if fta is not None else "–", f"{corr(cdc):.2f}",
                   f"{corr(cdc - fta):.2f}" if fta is not None else "–"])
  return lines + tables.table(head, rows) + [""]


def code_distance_plot(workdir, results, task) -> list:
  """gain_vs_code_distance.png: each device's gain over global against its FDA code distance
  (cdc_mmpg, fta_k5, oracle; test and OOD); [] without the diagnosis."""
  sel = task.selection_metric.name
  cdc = results["methods"].get("cdc_mmpg", {}).get("per_device", {})
  if "code_distance" not in cdc:
    return []
  with plots.figure(os.path.join(workdir, "gain_vs_code_distance.png"),
                    figsize=(7, 4.5)) as (_, axes):
    ax = axes[0][0]
    for sfx, marker, grp in (("", "o", "test"), ("_ood", "^", "OOD")):
      if "code_distance" + sfx not in cdc:
        continue
      for method, color in (("cdc_mmpg", "tab:blue"), ("fta_k5", "tab:orange"),
                            ("oracle", "tab:green")):
        gain = rf.gains(results, method, sel, sfx)
        if gain is not None:
          ax.scatter(cdc["code_distance" + sfx], gain, marker=marker, color=color, s=18,
                     alpha=0.8, label=f"{method}, {grp}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("device's FDA code distance to meta-training devices (typical spacing = 1)")
    ax.set_ylabel(f"gain in {sel} over global")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  return ["gain_vs_code_distance.png"]


def anchor_lines(results, task) -> list:
  """The ADR table: each anchored row's selector and budget K, its uplink, the MMD² of its
  anchors to the context, its metric and downlink."""
  m = results["methods"]
  anchored = {n: r for n, r in m.items() if "selector" in r.get("info", {})}
  if not anchored:
    return []
  sel = task.selection_metric
  base = results["device_model_bytes"]
  lines = ["## Anchors (ADR): selector and budget K", "",
           "MMD² between the weighted anchors and all anchor elements of the context (RBF, "
           "median bandwidth; the primary modality), mean over devices. Downlink as a share "
           f"of the device model's {base:,} bytes.", ""]
  head = ["method", "selector", "K", "uplink B", "MMD² test", f"{sel.name} test",
          f"{sel.name} OOD", "downlink B", "downlink / model"]
  rows = []
  for n, r in sorted(anchored.items(), key=lambda kv: (kv[1]["info"]["selector"],
                                                       kv[1]["info"]["k"])):
    mt = r["metrics"]
    rows.append([n, r["info"]["selector"], r["info"]["k"], f"{r['uplink_bytes']:.0f}",
                 f"{mt.get('anchor_mmd2', float('nan')):.4f}", rf.fmt(sel, mt[sel.name]),
                 rf.fmt(sel, mt.get(sel.name + "_ood", float("nan"))),
                 f"{r['downlink_bytes']:.0f}", f"{100 * r['downlink_bytes'] / base:.1f}%"])
  return lines + tables.table(head, rows) + [""]


def k_sweep_plot(workdir, results, task) -> list:
  """anchor_k_sweep.png: the test metric of the herding rows against their uplink bytes, one
  point per K; [] with fewer than two such rows."""
  sel = task.selection_metric.name
  m = results["methods"]
  sweep = sorted((r["info"]["k"], r["uplink_bytes"], r["metrics"][sel]) for r in m.values()
                 if r.get("info", {}).get("selector") == "herding")
  if len(sweep) < 2:
    return []
  with plots.figure(os.path.join(workdir, "anchor_k_sweep.png"), figsize=(6, 4)) as (_, axes):
    ax = axes[0][0]
    ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "ko-", ms=4, label="herding, K sweep")
    for k, up, v in sweep:
      ax.annotate(f"K={k}", (up, v), fontsize=7, xytext=(2, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("uplink bytes per device")
    ax.set_ylabel(f"test {sel}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  return ["anchor_k_sweep.png"]


def report_lines(results, task, workdir) -> list:
  """cdc_mmpg's own sections of report.md: the anchors table with its K sweep, the diagnosis
  table and its plot."""
  plots = k_sweep_plot(workdir, results, task) + code_distance_plot(workdir, results, task)
  return (anchor_lines(results, task) + diagnosis_lines(results, task)
          + [f"![{p}]({p})" for p in plots])
