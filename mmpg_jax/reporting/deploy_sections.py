"""report.md's deployment sections and figures: the accuracy-cost frontier of every method, and
the deployment studies (compressed traffic, label-free rollback, request policies)."""
import os

import numpy as np

from mmpg_jax.core.protocol import ORACLE
from mmpg_jax.reporting import formats as rf
from mmpg_jax.reporting import frontier as fr
from mmpg_jax.reporting import plots, tables

# cost axis -> (label, what it measures)
AXES = {
    "device_flops": ("device FLOPs per window", "the adaptation's FLOPs plus inference on the "
                     "window's query samples (XLA cost analysis)"),
    "bytes_per_request": ("bytes per request (up + down)", "uplink + downlink bytes at the "
                          "run's comm_dtype"),
    "device_peak_bytes": ("peak device memory (bytes)", "the resident device model plus the "
                          "largest working set (XLA's memory analysis: temporaries + outputs) "
                          "of the programs a method runs: inference on one sample, and each "
                          "adaptation program as the method runs it (a context window, a "
                          "gradient step's batch, a merge)"),
}
GROUPS = (("test", ""), ("test_ood", "_ood"))


# The oracle (many labels and backward passes: the upper bound, not a method) is drawn as a
# reference line, not a point that could sit on the frontier.
REFERENCE = ORACLE


def frontier(results, task, queries_per_window: int) -> dict:
  """{axis: {group: [{method, cost, value, pareto, labels}]}} over every method of the run but
  the oracle (its value under "reference")."""
  sel = task.selection_metric
  infer = results["device_inference_flops_per_sample"] * queries_per_window
  m = results["methods"]
  out = {"reference": {grp: m[REFERENCE]["metrics"].get(sel.name + sfx)
                       for grp, sfx in GROUPS if REFERENCE in m}}
  for axis in AXES:
    out[axis] = {}
    for grp, sfx in GROUPS:
      pts = {}
      for name, r in m.items():
        v = r["metrics"].get(sel.name + sfx)
        if v is None or name == REFERENCE:
          continue
        cost = {"device_flops": r["device_flops"] + infer,
                "bytes_per_request": r["uplink_bytes"] + r["downlink_bytes"],
                "device_peak_bytes": r.get("device_peak_bytes", float("nan"))}[axis]
        pts[name] = (cost, v)
      if pts:
        out[axis][grp] = [dict(p, labels=m[p["method"]]["labels_used_per_device"])
                          for p in fr.frontier(pts, sel.higher_is_better)]
  return out


def frontier_lines(results, task) -> list:
  fro = results.get("frontier") or {}
  if not fro:
    return []
  sel = task.selection_metric
  ref = fro.get("reference", {})
  lines = ["## Accuracy–cost frontier", "",
           f"Test {sel.name} of every method against what a device pays; a method is on the "
           "Pareto frontier (★) when no other method costs no more and scores no less, better "
           "in one. frontier.png plots them, test and OOD side by side (× marks a method that "
           "reads labels on the device)."
           + (f" The oracle ({', '.join(f'{g} {rf.fmt(sel, v)}' for g, v in ref.items())}) "
              "is the upper bound, drawn as a line, not a point." if ref else ""), ""]
  for axis, (label, what) in AXES.items():
    per = fro.get(axis, {})
    if "test" not in per:
      continue
    on = {g: {p["method"] for p in pts if p["pareto"]} for g, pts in per.items()}
    rows = []
    for p in per["test"]:
      cells = []
      for g, pts in per.items():
        q = next((x for x in pts if x["method"] == p["method"]), None)
        cells.append("–" if q is None else
                     rf.fmt(sel, q["value"]) + (" ★" if q["method"] in on[g] else ""))
      rows.append([p["method"], f"{p['cost']:.3g}"] + cells)
    lines += ([f"**{label}**: {what}.", ""]
              + tables.table(["method", "cost"] + [f"{sel.name} {g}" for g in per], rows) + [""])
  return lines


def _pct(x):
  return "–" if x is None or not np.isfinite(x) else f"{100 * x + 0.0:.1f}%"


def traffic_lines(dep, task) -> list:
  tr = dep.get("traffic") or {}
  methods = {k: v for k, v in tr.items() if not k.startswith("_")}
  if not methods:
    return []
  sel = task.selection_metric
  groups = list(next(iter(methods.values()))["rows"][0]["groups"])
  lines = ["## Compressed traffic", "",
           "Each method's uplink (the context features it uploads from) and downlink (each "
           "leaf's change under its edit) through float16, int8 or int4 with one float16 scale "
           "per row, on the float device model and on an int8 one (every weight int8, per-row "
           f"scales). Δ is the change in {sel.name} against the float32 round trip on the float "
           "model. The selected encoding (✓) is the smallest whose validation score is within "
           "the tolerance of float32's.", ""]
  unedited = tr.get("_int8_model_unedited")
  if unedited:
    lines += [f"The int8 device model without any edit: validation "
              f"{rf.fmt(sel, unedited['validation'])}, "
              + ", ".join(f"{g} {rf.fmt(sel, v)}" for g, v in unedited["groups"].items())
              + ".", ""]
  head = (["method", "encoding", "device model", "uplink B", "downlink B", "validation"]
          + [c for g in groups for c in (g, f"Δ {g}")])
  rows = []
  for name, t in methods.items():
    ref = next(r for r in t["rows"] if r["encoding"] == "float32" and not r["int8_model"])
    for r in t["rows"]:
      mark = " ✓" if r["encoding"] == t["selected"] and not r["int8_model"] else ""
      rows.append([name, f"{r['encoding']}{mark}", "int8" if r["int8_model"] else "float32",
                   f"{r['uplink_bytes']:.0f}", f"{r['downlink_bytes']:.0f}",
                   rf.fmt(sel, r["validation"])]
                  + [c for g in groups for c in (rf.fmt(sel, r["groups"][g]),
                                                 rf.fmt(sel, r["groups"][g] - ref["groups"][g]))])
  return lines + tables.table(head, rows) + [""]


def rollback_lines(dep, task) -> list:
  rbk = dep.get("rollback") or {}
  if not rbk:
    return []
  sel = task.selection_metric
  names = list(next(iter(rbk.values()))["groups"]["test"]["auroc"])
  lines = ["## Label-free rollback", "",
           "Before swapping in an edit the device runs the edited and its current model forward "
           "on its own unlabelled data and keeps the current model where the check's score "
           "exceeds a threshold: `entropy_rise` (the edited model's prediction entropy minus "
           "the current one's) or `disagreement` (the share of top predictions the edit "
           "changes). The check and its threshold are chosen on validation devices (`never`: "
           "no check beat keeping every edit). Harmed: the edit scores below the unedited model "
           "on the device; labels are read only for that column, the chosen check's "
           "precision/recall and each check's AUROC at spotting harmed devices (50% = "
           "chance).", ""]
  head = (["method", "check > threshold", "group", "harmed before", "harmed after",
           "rolled back", "precision", "recall"] + [f"AUROC {n}" for n in names]
          + [f"{sel.name} edited", "after check", "unedited"])
  rows = []
  for name, r in rbk.items():
    rule = "never" if r["check"] == "never" else f"{r['check']} > {r['threshold']:.3g}"
    for g, s in r["groups"].items():
      rows.append([name, rule, g]
                  + [_pct(s[k]) for k in ("harmed_before", "harmed_after", "rolled_back",
                                          "precision", "recall")]
                  + [_pct(s["auroc"][n]) for n in names]
                  + [rf.fmt(sel, s[k]) for k in ("metric_edited", "metric_after",
                                                 "metric_unedited")])
  return lines + tables.table(head, rows) + [""]


def kept_share_header(gain, groups, names, ms):
  """(the always-ask gain over never as text, the kept-share table's header cells with † on the
  columns whose gain interval is not above 0). gain: {group: {metric: [mean, low, high]}}."""
  cols = [(g, k) for g in groups for k in names]
  text = "; ".join(f"{k} {g} {rf.fmt(ms[k], gain[g][k][0])} [{rf.fmt(ms[k], gain[g][k][1])}, "
                   f"{rf.fmt(ms[k], gain[g][k][2])}]" for g, k in cols if g in gain)
  weak = {(g, k) for g, k in cols if g in gain and not gain[g][k][1] > 0}
  head = ["budget", "policy"] + [f"{k} {g}" + (" †" if (g, k) in weak else "") for g, k in cols]
  return text, head


def policy_lines(dep, task) -> list:
  rp = dep.get("request_policies")
  if not rp:
    return []
  ms = {m.name: m for m in task.metrics}
  names = rp["metrics"]
  groups = [g for g in rp["points"][0]["rate"] if g != "validation"]
  up, down = rp["bytes_per_request"]["uplink"], rp["bytes_per_request"]["downlink"]
  lines = ["## Request policies: when a device asks", "",
           f"Edits of `{rp['method']}` ({up:.0f} B up, {down:.0f} B down per request) over "
           f"{rp['windows']} window position(s). A device starts on the global model; at each "
           "window its policy decides from label-free features whether to request a new edit; "
           "otherwise it keeps the last one. Thresholds (and every_k's k) are set on validation "
           "streams for each request budget; the learned policy's gain predictor is fitted on "
           f"validation streams too. Bytes per device-hour at {rp['windows_per_hour']:g} "
           "window(s) an hour. request_policies.png plots the curves.", ""]
  head = (["policy", "budget", "parameter"]
          + [c for g in groups for c in [f"requests {g}"] + [f"{k} {g}" for k in names]]
          + ["up B/device-hour test", "down B/device-hour test"])
  rows = []
  for p in rp["points"]:
    b = "–" if p["budget"] is None else f"{100 * p['budget']:.0f}%"
    par = "–" if p["param"] is None else f"{p['param']:.4g}"
    bh = p["bytes_per_device_hour"]["test"]
    rows.append([p["policy"], b, par]
                + [c for g in groups for c in [_pct(p["rate"][g])]
                   + [rf.fmt(ms[k], p["metric"][g][k]) for k in names]]
                + [f"{bh['uplink']:.0f}", f"{bh['downlink']:.0f}"])
  lines += tables.table(head, rows)
  gain_text, head = kept_share_header(rp.get("always_gain", {}), groups, names, ms)
  lines += ["", f"Always-ask minus never (paired over devices, bootstrap 95% interval): "
            f"{gain_text}.", "",
            "Share of the always-ask gain over `never` kept at each budget ((policy − "
            "never) / (always − never), bootstrap 95% interval over devices). † marks a column "
            "whose always-ask gain is not above 0: there the share is a ratio of noise and "
            "means nothing.", ""]
  rows = [[f"{100 * float(budget):.0f}%", policy]
          + ["{} [{}, {}]".format(*(_pct(x) for x in by_group[g][k]))
             for g in groups for k in names]
          for budget, per in rp["kept_share"].items() for policy, by_group in per.items()]
  return lines + tables.table(head, rows) + [""]


def lines(results, task) -> list:
  dep = results.get("deployment") or {}
  return (frontier_lines(results, task) + traffic_lines(dep, task) + rollback_lines(dep, task)
          + policy_lines(dep, task))


def write_plots(workdir: str, results: dict, task) -> list:
  """frontier.png and request_policies.png where the run has them; the names written."""
  sel = task.selection_metric.name
  out = []
  fro = results.get("frontier") or {}
  if fro:
    _frontier_plot(os.path.join(workdir, "frontier.png"), fro, sel)
    out.append("frontier.png")
  rp = (results.get("deployment") or {}).get("request_policies")
  if rp:
    _policy_plot(os.path.join(workdir, "request_policies.png"), rp)
    out.append("request_policies.png")
  return out


def _frontier_plot(path: str, fro: dict, sel: str) -> None:
  """One panel per group (rows) and cost axis (columns): every method's cost and score, the
  Pareto frontier as a step line, the oracle as a reference line."""
  groups = [g for g, _ in GROUPS if g in fro["device_flops"]]
  ref = fro.get("reference", {})
  with plots.figure(path, len(groups), len(AXES),
                    figsize=(5 * len(AXES), 3.8 * len(groups))) as (_, axes):
    for i, g in enumerate(groups):
      for j, axis in enumerate(AXES):
        ax, pts = axes[i][j], fro[axis][g]
        for labelled, marker in ((False, "o"), (True, "x")):
          sub = [p for p in pts if (p["labels"] > 0) == labelled]
          ax.scatter([max(p["cost"], 1.0) for p in sub], [p["value"] for p in sub], s=14,
                     marker=marker, color="tab:blue",
                     label="reads labels" if labelled and sub else None)
        if ref.get(g) is not None:
          ax.axhline(ref[g], color="k", ls="--", lw=0.8, label=ORACLE)
        on = sorted((max(p["cost"], 1.0), p["value"], p["method"]) for p in pts if p["pareto"])
        ax.step([x for x, _, _ in on], [v for _, v, _ in on], where="post", color="tab:red",
                lw=1.2, label="Pareto frontier")
        for x, v, n in on:
          ax.annotate(n, (x, v), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(AXES[axis][0] + " (0 at 1)")
        ax.set_ylabel(f"{sel} {g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")


def _policy_plot(path: str, rp: dict) -> None:
  """One panel per metric (rows) and group (columns): each policy's score against its request
  rate, always and never as reference lines."""
  groups = [g for g in rp["points"][0]["rate"] if g != "validation"]
  names = rp["metrics"]
  with plots.figure(path, len(names), len(groups),
                    figsize=(5.5 * len(groups), 4 * len(names))) as (_, axes):
    for i, k in enumerate(names):
      for ax, g in zip(axes[i], groups):
        for policy in ("every_k", "drift", "learned"):
          pts = sorted((p["rate"][g], p["metric"][g][k]) for p in rp["points"]
                       if p["policy"] == policy)
          ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, label=policy)
        for policy, style in (("always", "--"), ("never", ":")):
          p = next(p for p in rp["points"] if p["policy"] == policy)
          ax.axhline(p["metric"][g][k], color="k", ls=style, lw=0.8, label=policy)
        ax.set_xlabel("share of windows that request")
        ax.set_ylabel(f"{k} {g}")
        ax.set_title(f"{rp['method']}: {g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
