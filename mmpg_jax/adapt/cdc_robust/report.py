"""The cdc_robust family's section of report.md: cdc_mmpg, its variants and controls beside
the forward-only rivals and fta_k5, and how the router of `routed` weighs its experts."""
import numpy as np

from mmpg_jax.reporting import formats as rf
from mmpg_jax.reporting import tables


def robustness_lines(results, task) -> list:
  """cdc_mmpg, its variants and controls (this family's rows) and the forward-only rivals
  side by side, with fta_k5: what holds up out of distribution, at what cost."""
  m = results["methods"]
  rows = [n for n in m if n == "cdc_mmpg" or m[n].get("family") == "cdc_robust"
          or m[n].get("role") == "rival"]
  if len(rows) < 2:
    return []
  rows += [n for n in ("fta_k5", "global", "oracle") if n in m]
  sel = task.selection_metric
  lines = ["## Beyond the training shifts: variants, controls and forward-only rivals", "",
           "cdc_mmpg_<variant> rows and the controls (mean_edit: the mean meta-training edit for "
           "every device; noisy_mean_edit: the mean edit plus noise at the training edits' own "
           "per-element spread; nearest_edit: the edit of the nearest meta-training device by FDA "
           "code), the forward-only rivals, and fta_k5 (labels + backprop) for reference. Every "
           "robustness variant's grid is chosen on the validation OOD devices (a held-out shift "
           "family disjoint from the test OOD group's: 'selected on'), every other row's on "
           "validation devices; the test OOD group is never read by a choice. Cloud FLOPs: "
           "per-device work beyond generating the edit.", ""]
  head = ["method", "selected on", "selection score", f"{sel.name} val OOD", f"{sel.name} test",
          f"{sel.name} OOD", "OOD closed", "labels", "backward passes", "cloud backward passes",
          "device FLOPs", "cloud FLOPs", "uplink B", "downlink B"]
  nan = float("nan")
  body = []
  for n in rows:
    r, mt = m[n], m[n]["metrics"]
    body.append([n, r.get("selected_on", "validation"),
                  rf.fmt(sel, r.get(f"validation_{sel.name}", nan)),
                  rf.fmt(sel, mt.get(sel.name + "_val_ood", nan)),
                  rf.fmt(sel, mt.get(sel.name, nan)), rf.fmt(sel, mt.get(sel.name + "_ood", nan)),
                  rf.share(mt.get("margin_closed_ood", nan)), r["labels_used_per_device"],
                  r["device_backward_passes"], r.get("cloud_backward_passes", 0),
                  rf.fmt_flops(r["device_flops"]), rf.fmt_flops(r.get("cloud_flops", 0)),
                  f"{r['uplink_bytes']:.0f}", f"{r['downlink_bytes']:.0f}"])
  return lines + tables.table(head, body) + [""] + routing_lines(results, task)


def routing_lines(results, task) -> list:
  """cdc_mmpg_routed: how much weight the router gives the wide FDA per group, and whether the
  devices it leans wide on are those where the wide FDA beats the plain one."""
  m = results["methods"]
  pd = m.get("cdc_mmpg_routed", {}).get("per_device", {})
  if "route_wide" not in pd:
    return []
  sel = task.selection_metric.name
  out = []
  for grp, sfx in rf.SUFFIX.items():
    if "route_wide" + sfx not in pd:
      continue
    w = np.asarray(pd["route_wide" + sfx])
    wide, plain = (rf.gains(results, n, sel, sfx) for n in ("cdc_mmpg_wide", "cdc_mmpg"))
    diff = wide - plain if wide is not None and plain is not None else None
    corr = (float(np.corrcoef(w, diff)[0, 1]) if diff is not None and len(w) > 2
            and w.std() > 0 and diff.std() > 0 else float("nan"))
    out.append(f"{grp}: mean weight {w.mean():.2f}, {np.mean(w > 0.5):.0%} of devices above "
               f"0.5, corr(weight, wide − plain {sel}) {corr:.2f}")
  return ["cdc_mmpg_routed, the router's weight on the wide FDA's edit per device (sharpness 1, "
          "as trained): " + "; ".join(out) + ".", ""]
