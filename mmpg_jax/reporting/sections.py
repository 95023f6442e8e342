"""The generic sections of report.md, each a function of results.json (and the task's
metrics): the main table, the headline table the main job prints, what each row saw, the
paired differences, the OOD claim, ablations, per-window figures and validation curves.
They read rows' typed fields (role, ablation_of, seen, selected_on), never a method's name."""
import numpy as np

from mmpg_jax.core.protocol import BASE
from mmpg_jax.reporting import comparisons
from mmpg_jax.reporting import formats as rf
from mmpg_jax.reporting import tables
from mmpg_jax.reporting.formats import SUFFIX

NAN = float("nan")


def main_table(results, task) -> list:
  """Every row: the selection metric (test, ± std, closed, OOD, val OOD), the other metrics,
  what a device pays and what was selected."""
  sel, others = task.selection_metric, task.metrics[1:]
  head = ([f"method", f"{sel.name} test", "± std", "closed", f"{sel.name} OOD", "OOD closed",
           f"{sel.name} val OOD", "selected on"]
          + [c for x in others for c in (f"{x.name} test", f"{x.name} OOD")]
          + ["labels", "backward passes", "cloud backward passes", "device FLOPs",
             "cloud FLOPs", "uplink B", "downlink B", "selected"])
  rows = []
  for name, r in results["methods"].items():
    mt = r["metrics"]
    get = lambda k: mt.get(k, NAN)
    rows.append([name, rf.fmt(sel, get(sel.name)), rf.fmt(sel, get(sel.name + "_std")),
                 rf.share(get("margin_closed")), rf.fmt(sel, get(sel.name + "_ood")),
                 rf.share(get("margin_closed_ood")), rf.fmt(sel, get(sel.name + "_val_ood")),
                 r.get("selected_on", "validation")]
                + [c for x in others for c in (rf.fmt(x, get(x.name)),
                                               rf.fmt(x, get(x.name + "_ood")))]
                + [r["labels_used_per_device"], r["device_backward_passes"],
                   r.get("cloud_backward_passes", 0), rf.fmt_flops(r["device_flops"]),
                   rf.fmt_flops(r.get("cloud_flops", 0)), f"{r['uplink_bytes']:.0f}",
                   f"{r['downlink_bytes']:.0f}", r["selected_hparams"]])
  return tables.table(head, rows)


def headline_table(results: dict, task) -> list:
  """The compact table the main job prints when it ends: per method the selection metric on
  test and OOD devices, the share of the oracle − global margin it closes, and what a device
  pays (labels, backward passes, bytes up and down). A run without an oracle, an OOD group
  (seqrec's official protocol) or a validation OOD group leaves those columns out."""
  sel = task.selection_metric
  fmt = lambda key: lambda mt: rf.fmt(sel, mt.get(key, NAN))
  share = lambda key: lambda mt: rf.share(mt.get(key, NAN))
  margin = bool(results.get("oracle_global_margin", True))     # no oracle: nothing closed
  cols = [(f"{sel.name} test", fmt(sel.name))] + ([("closed", share("margin_closed"))]
                                                   if margin else [])
  if results.get("num_ood_devices", 1):
    cols += [(f"{sel.name} OOD", fmt(sel.name + "_ood"))] + (
        [("OOD closed", share("margin_closed_ood"))] if margin else [])
  if results.get("num_val_ood_devices", 1):
    cols += [("val OOD", fmt(sel.name + "_val_ood"))]
  head = (["method"] + [c for c, _ in cols]
          + ["labels", "backward passes", "cloud backward passes", "uplink B", "downlink B"])
  rows = [[name] + [f(r["metrics"]) for _, f in cols]
          + [r["labels_used_per_device"], r["device_backward_passes"],
             r.get("cloud_backward_passes", 0), f"{r['uplink_bytes']:.0f}",
             f"{r['downlink_bytes']:.0f}"]
          for name, r in results["methods"].items()]
  return tables.table(head, rows)


def seen_lines(results) -> list:
  """What each row is and saw: its role, the device's labels, the labelled meta devices
  behind it (meta-training or a control's training) and their shift families, and where it
  departs from its paper."""
  rows = []
  for n, r in results["methods"].items():
    seen = r.get("seen", {})
    role = r.get("role", "–") + (f" of {r['ablation_of']}" if r.get("ablation_of") else "")
    rows.append([n, role, r["labels_used_per_device"], seen.get("meta_devices", 0),
                 seen.get("shifts", "–"), seen.get("note", "")])
  return (["## What each row saw", "",
           "Role: baseline, rival (a forward-only method to beat), control (rules an "
           "explanation out), ablation (of the row named), ours. Labels: per device, from its "
           "own data. Meta devices: labelled simulated devices the cloud trained this row on "
           "(never the evaluated devices); shifts: the families those devices were drawn from "
           "('training': the global model's ranges).", ""]
          + tables.table(["method", "role", "device labels", "meta devices", "shifts", "note"],
                         rows) + [""])


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


def ablation_lines(results, task) -> list:
  """Rows of role "ablation", beside the rows they vary (`ablation_of`)."""
  m = results["methods"]
  rows = [n for n in m if m[n].get("role") == "ablation"]
  if not rows:
    return []
  bases = [n for n in m if n not in rows and any(m[r].get("ablation_of") == n for r in rows)]
  sel = task.selection_metric
  cells = [[n, m[n].get("varies") or "(as configured)",
            rf.fmt(sel, m[n].get(f"validation_{sel.name}", NAN)),
            rf.fmt(sel, m[n]["metrics"].get(sel.name, NAN)),
            rf.fmt(sel, m[n]["metrics"].get(sel.name + "_ood", NAN)),
            f"{m[n]['downlink_bytes']:.0f}"] for n in bases + rows]
  return (["## Ablations", "",
           "Each ablation row is trained as its own stage and selected like every other row "
           "(validation devices only), beside the row it varies.", ""]
          + tables.table(["method", "ablation", f"validation {sel.name}", f"{sel.name} test",
                          f"{sel.name} OOD", "downlink B"], cells) + [""])


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
    if key not in m[BASE].get("per_window", {}):
      continue
    rows = [[name] + [rf.fmt(sel, v) for v in r["per_window"][key]]
            for name, r in m.items() if r.get("per_window", {}).get(key)]
    lines += tables.table([f"method ({grp})"] + [f"w{i}" for i in range(w)], rows) + [""]
  return lines


def curve_lines(results) -> list:
  """The validation curves of the stages that recorded one (the global model with
  `train.eval_every`, DUET's generator): where each stopped and why."""
  curves = results.get("training_curves") or {}
  if not curves:
    return []
  rows = []
  for stage, c in curves.items():
    metric, pts = c["metric"], c["curve"]
    steps, vals = pts["step"], pts[metric]
    if not steps:
      continue
    kept = steps.index(c["best_step"]) if c["best_step"] in steps else int(np.argmax(vals))
    every = steps[1] - steps[0] if len(steps) > 1 else steps[0]
    shown = ", ".join(f"{s}: {v:.4f}" for s, v in zip(steps, vals))
    rows.append([stage, metric, every, c["steps"], steps[kept], f"{vals[kept]:.4f}",
                 f"{vals[-1]:.4f}", shown])
  return (["## Validation curves", "",
           "Each stage scored on the validation devices as it trains; the step it keeps is the "
           "best-scoring one (test devices are never read for this). "
           "validation_curves.png plots them.", ""]
          + tables.table(["stage", "metric", "evaluated every", "steps", "kept step",
                          "val at kept step", "val at last step", "curve (step: value)"], rows)
          + [""])
