"""The deployment studies over several runs (seeds): request policies (the curves, and the kept
share of the always-ask gain pooled over runs with a stratified bootstrap interval), label-free
rollback and compressed traffic, as mean ± sample std over runs.
`python -m mmpg_jax.reporting.aggregate` appends these tables when its runs have a `deployment`."""
import numpy as np

from mmpg_jax import deploy, tasks
from mmpg_jax.reporting import deploy_sections, stats
from mmpg_jax.reporting.tables import table  # by name: `tables` is this module's own function


def _ms(run):
  return {m.name: m for m in tasks.get(run["task"]).metrics}


def _pm(xs, scale=1.0, decimals=2) -> str:
  xs = np.asarray(xs, np.float64) * scale
  if not np.isfinite(xs).any():
    return "–"
  sd = stats.sample_std(xs)
  return f"{np.nanmean(xs):.{decimals}f} ± " + (f"{sd:.{decimals}f}" if np.isfinite(sd) else "–")


def _metric_pm(metric, xs) -> str:
  return _pm(xs, 100.0 if metric.percent else 1.0, metric.decimals)


def policy_tables(runs) -> list:
  rps = [r["deployment"]["request_policies"] for r in runs
         if "request_policies" in r.get("deployment", {})]
  if not rps:
    return []
  ms, names = _ms(runs[0]), rps[0]["metrics"]
  groups = [g for g in rps[0]["points"][0]["rate"] if g != "validation"]
  lines = ["", f"Request policies for `{rps[0]['method']}`'s edits over {len(rps)} runs (mean ± "
           "sample std over runs; requests = share of windows that ask):", ""]
  head = ["policy", "budget"] + [c for g in groups
                                 for c in [f"requests {g}"] + [f"{k} {g}" for k in names]]
  rows = []
  for i, p in enumerate(rps[0]["points"]):
    pts = [rp["points"][i] for rp in rps]
    b = "–" if p["budget"] is None else f"{100 * p['budget']:.0f}%"
    rows.append([p["policy"], b] + [
        c for g in groups for c in [_pm([q["rate"][g] for q in pts], 100.0, 1) + "%"]
        + [_metric_pm(ms[k], [q["metric"][g][k] for q in pts]) for k in names]])
  lines += table(head, rows)
  budgets = [float(b) for b in rps[0]["kept_share"]]
  pooled = deploy.kept_shares(rps, groups, budgets)
  gain_text, head = deploy_sections.kept_share_header(deploy.always_gain(rps, groups), groups,
                                                    names, ms)
  lines += ["", "Always-ask minus never, pooled over the runs (paired per device, 95% bootstrap "
            f"interval stratified by run): {gain_text}.", "",
            "Share of the always-ask gain over `never` kept, pooled over the runs (each run "
            "weighs the same; 95% bootstrap interval resampling devices within runs), and the "
            "per-run shares' mean ± std. † marks a column whose always-ask gain is not above 0 "
            "(the share is then a ratio of noise):", ""]
  rows = []
  for budget in budgets:
    for policy in ("every_k", "drift", "learned"):
      cells = []
      for g in groups:
        for k in names:
          s, lo, hi = pooled[str(budget)][policy][g][k]
          per_run = [rp["kept_share"][str(budget)][policy][g][k][0] for rp in rps]
          cells.append(f"{100 * s:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] "
                       f"({_pm(per_run, 100.0, 0)})" if np.isfinite(s) else "–")
      rows.append([f"{100 * budget:.0f}%", policy] + cells)
  return lines + table(head, rows)


def rollback_table(runs) -> list:
  rbs = [r["deployment"]["rollback"] for r in runs if "rollback" in r.get("deployment", {})]
  if not rbs:
    return []
  sel = tasks.get(runs[0]["task"]).metrics[0]
  first = next(iter(rbs[0].values()))
  names = list(first["groups"]["test"]["auroc"])
  lines = ["", f"Label-free rollback over {len(rbs)} runs (mean ± sample std over runs; % of "
           "devices, or of the rolled-back devices for precision; the check each run chose on "
           "validation):", ""]
  head = (["method", "checks chosen", "group", "harmed before", "harmed after", "rolled back",
           "precision", "recall"] + [f"AUROC {n}" for n in names]
          + [f"{sel.name} edited", "after check", "unedited"])
  rows = []
  for name in rbs[0]:
    chosen = ", ".join(rb[name]["check"] for rb in rbs if name in rb)
    for g in rbs[0][name]["groups"]:
      s = [rb[name]["groups"][g] for rb in rbs if name in rb]
      rows.append([name, chosen, g]
                  + [_pm([x[k] for x in s], 100.0, 1) for k in
                     ("harmed_before", "harmed_after", "rolled_back", "precision", "recall")]
                  + [_pm([x["auroc"][n] for x in s], 100.0, 1) for n in names]
                  + [_metric_pm(sel, [x[k] for x in s]) for k in
                     ("metric_edited", "metric_after", "metric_unedited")])
  return lines + table(head, rows)


def traffic_table(runs) -> list:
  trs = [r["deployment"]["traffic"] for r in runs if "traffic" in r.get("deployment", {})]
  if not trs:
    return []
  sel = tasks.get(runs[0]["task"]).metrics[0]
  methods = [n for n in trs[0] if not n.startswith("_")]
  groups = list(trs[0][methods[0]]["rows"][0]["groups"]) if methods else []
  lines = ["", f"Compressed traffic over {len(trs)} runs: bytes per request and the change "
           f"against float32 on the float model (mean ± sample std over runs); 'default' counts "
           "the runs whose validation chose the encoding:", ""]
  head = (["method", "encoding", "device model", "bytes (up + down)", "Δ validation"]
          + [f"Δ {g}" for g in groups] + ["default"])
  rows = []
  for name in methods:
    for i, r in enumerate(trs[0][name]["rows"]):
      per = [(t[name]["rows"][i], next(x for x in t[name]["rows"]
                                       if x["encoding"] == "float32" and not x["int8_model"]))
             for t in trs if name in t]
      d = lambda key, g=None: _metric_pm(sel, [(a["groups"][g] - b["groups"][g]) if g else
                                               (a[key] - b[key]) for a, b in per])
      chosen = ("–" if r["int8_model"] else
                f"{sum(t[name]['selected'] == r['encoding'] for t in trs)}/{len(trs)}")
      rows.append([name, r["encoding"], "int8" if r["int8_model"] else "float32",
                   f"{r['bytes']:,.0f} ({r['uplink_bytes']:,.0f} + {r['downlink_bytes']:,.0f})",
                   d("validation")] + [d(None, g) for g in groups] + [chosen])
  return lines + table(head, rows)


def tables(runs) -> list:
  return policy_tables(runs) + rollback_table(runs) + traffic_table(runs)
