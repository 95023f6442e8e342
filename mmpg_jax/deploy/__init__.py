"""Deployment studies, run after the evaluation on the methods it selected (config.deploy):

- traffic: every method that sends something, its uplink and downlink in float32 / float16 /
  int8 / int4 (per-row scales), on a float and an int8 device model; the default encoding is
  the smallest within `codec_tolerance` of float32 on validation (deploy.traffic);
- rollback: a label-free check a device runs before swapping in an edit, the check and its
  threshold chosen on validation (deploy.rollback);
- request policies (stream tasks): when a device asks for a new edit of `policy_method`
  (always, never, every_k, a drift trigger, a learned gain predictor), at request budgets
  chosen on validation streams (deploy.policies, deploy.streams).

Every choice (encoding, rollback threshold, policy threshold, the learned policy's weights) is
made on validation devices; test and OOD devices are only scored.
"""
import time

import numpy as np
from absl import logging

from mmpg_jax.core import codec
from mmpg_jax.core.config_errors import ConfigError
from mmpg_jax.deploy import policies as pol
from mmpg_jax.deploy import rollback as rb
from mmpg_jax.deploy import streams, traffic
from mmpg_jax.reporting import stats


def check_names(methods, cfg) -> None:
  """Refuses (before the evaluation) deploy.methods / deploy.policy_method naming a method the
  run does not build, or a stream method as the policies' method."""
  dc, by_name = cfg.deploy, {m.name: m for m in methods}
  unknown = [n for n in tuple(dc.methods) + ((dc.policy_method,) if dc.policy_method else ())
             if n not in by_name]
  if unknown:
    raise ConfigError(f"config.deploy.methods/policy_method name {unknown}, which this run does "
                      f"not build; built: {sorted(by_name)}")
  if dc.policy_method and by_name[dc.policy_method].stream is not None:
    raise ConfigError(f"config.deploy.policy_method={dc.policy_method!r} keeps cloud state "
                      f"across windows (a stream method); request policies replay one device's "
                      f"edits, so pick a method whose edit depends on the request alone")


def studied(methods, costs_, cfg) -> list:
  """The methods the traffic and rollback studies cover: config.deploy.methods, or every
  method that sends something (a stream method, whose state lives in the cloud, excepted)."""
  by_name = {m.name: m for m in methods}
  named = tuple(cfg.deploy.methods)
  pick = [by_name[n] for n in named] if named else methods
  return [m for m in pick if m.stream is None and traffic.sends(costs_[m.name])]


def _progress(what, i, n, t0):
  """Logs study progress with its rate and ETA (a study can run for minutes)."""
  dt = time.time() - t0
  logging.info("%s: %d/%d done | %.1f s each, ETA %.0fs", what, i, n, dt / i, dt / i * (n - i))


def _selection(task, values):
  m = task.selection_metric
  return (1.0 if m.higher_is_better else -1.0) * np.asarray(values[m.name], np.float64)


def traffic_study(ev, task, model, params, cfg, methods, costs_, evals, val, groups) -> dict:
  dc = cfg.deploy
  rows_len = traffic.row_lengths(task, model, params, cfg)
  out = {}
  t_all = time.time()
  for i, m in enumerate(methods, 1):
    t0 = time.time()
    hp, cost = evals[m.name]["hp"], costs_[m.name]
    rows = []
    for int8_model in ((False, True) if dc.int8_model else (False,)):
      for enc in dc.encodings:
        em = traffic.encoded(m, task, enc, int8_model, cost)
        b = traffic.request_bytes(cost, enc, rows_len, cfg.comm_dtype)
        val_metric = float(_selection(task, ev.per_device_metrics(em, params, val, hp)).mean())
        rows.append({"encoding": enc, "int8_model": int8_model, "uplink_bytes": b["uplink"],
                     "downlink_bytes": b["downlink"], "bytes": b["uplink"] + b["downlink"],
                     "validation": val_metric,
                     "groups": {g: float(_selection(task, ev.per_device_metrics(
                         em, params, f, hp)).mean()) for g, f in groups.items()}})
    out[m.name] = {"rows": rows, "selected": traffic.choose(rows, dc.codec_tolerance)}
    logging.info("traffic %s: selected %s (%.1fs)", m.name, out[m.name]["selected"],
                 time.time() - t0)
    _progress("traffic study", i, len(methods), t_all)
  if dc.int8_model:
    held = codec.tree_roundtrip(params, "int8")
    out["_int8_model_unedited"] = {
        "validation": float(_selection(task, ev.identity_metrics(held, val)).mean()),
        "groups": {g: float(_selection(task, ev.identity_metrics(held, f)).mean())
                   for g, f in groups.items()}}
  return out


def rollback_study(ev, task, params, methods, evals, val, groups) -> dict:
  out = {}
  split = {"validation": val, **groups}
  base = {g: _selection(task, ev.identity_metrics(params, f)) for g, f in split.items()}
  t_all = time.time()
  for i, m in enumerate(methods, 1):
    t0 = time.time()
    hp = evals[m.name]["hp"]
    score = rb.scorer(ev, m, hp)
    s = {g: score(params, f) for g, f in split.items()}
    edited = {g: _selection(task, ev.per_device_metrics(m, params, f, hp))
              for g, f in split.items()}
    check, th = rb.choose(s["validation"], edited["validation"], base["validation"])
    out[m.name] = {"check": check, "threshold": th,
                   "groups": {g: rb.summary(s[g], edited[g], base[g], check, th)
                              for g in split}}
    logging.info("rollback %s: %s > %.4g, test harmed %.3f -> %.3f (%.1fs)", m.name, check, th,
                 out[m.name]["groups"]["test"]["harmed_before"],
                 out[m.name]["groups"]["test"]["harmed_after"], time.time() - t0)
    _progress("rollback study", i, len(methods), t_all)
  return out


def policy_study(ev, task, params, cfg, method, cost, hp, val, groups) -> dict:
  dc = cfg.deploy
  signs = {m.name: 1.0 if m.higher_is_better else -1.0 for m in task.metrics}
  names = [task.selection_metric.name] + [n for n in (task.curve_metric,)
                                          if n and n != task.selection_metric.name]
  metrics = {n: signs[n] for n in names}
  reference = streams.cloud_reference(task, val, cfg.seed)
  drift = streams.drift_fn(task, cfg.adr.selector, int(cfg.adr.k), cfg.seed)
  splits = {"validation": val, **groups}
  arrays, t_all = {}, time.time()
  for i, (g, f) in enumerate(splits.items(), 1):
    arrays[g] = streams.stream_arrays(ev, method, params, f, hp, reference, drift, metrics)
    _progress(f"request policies: {method.name}'s edits at every window pair", i, len(splits),
              t_all)
  weights = pol.fit_learned(arrays["validation"])
  hourly = {"uplink": cost.uplink_bytes * dc.windows_per_hour,
            "downlink": cost.downlink_bytes * dc.windows_per_hour}
  points = []
  for policy in pol.POLICIES:
    budgets = ([None] if policy in ("always", "never")
               else sorted(set(dc.curve) | set(dc.budgets)))
    for budget in budgets:
      param = (None if budget is None else float("inf")
               if policy in pol.THRESHOLDED and budget == 0
               else pol.calibrate(policy, budget, arrays["validation"], weights))
      point = {"policy": policy, "budget": budget, "param": param, "rate": {}, "metric": {},
               "bytes_per_device_hour": {}}
      # per-device means (over a device's windows), kept where kept shares are computed
      keep = budget is None or budget in dc.budgets
      if keep:
        point["per_device"] = {}
      for g, a in arrays.items():
        _, asked = pol.replay(policy, param, a, weights)
        r = pol.rate(asked, a["valid"])
        point["rate"][g] = r
        point["bytes_per_device_hour"][g] = {k: r * v for k, v in hourly.items()}
        point["metric"][g] = {}
        for k, (base, edited) in a["by_metric"].items():
          served = pol.serve(base, edited, asked, a["valid"])
          point["metric"][g][k] = metrics[k] * float(np.nanmean(served))
          if keep and g != "validation":
            point["per_device"].setdefault(g, {})[k] = [
                metrics[k] * float(x) for x in np.nanmean(served, 1)]
      points.append(point)
  out = {"method": method.name, "hp": hp, "metrics": names,
         "windows_per_hour": float(dc.windows_per_hour),
         "bytes_per_request": {"uplink": cost.uplink_bytes, "downlink": cost.downlink_bytes},
         "learned_weights": [float(w) for w in weights],
         "windows": int(arrays["test"]["base"].shape[1]), "points": points}
  out["kept_share"] = kept_shares([out], list(groups), dc.budgets)
  out["always_gain"] = always_gain([out], list(groups))
  return out


def always_gain(runs, groups) -> dict:
  """{group: {metric: [mean, low, high]}}: always-ask minus never, paired per device with a
  bootstrap interval (runs as strata). A kept share means something only where this interval
  lies above 0."""
  def per_device(rp, policy, g, k):
    p = next(p for p in rp["points"] if p["policy"] == policy)
    return np.asarray(p["per_device"][g][k])
  return {g: {k: list(stats.paired_bootstrap(
      [per_device(rp, "always", g, k) - per_device(rp, "never", g, k) for rp in runs]))
      for k in runs[0]["metrics"]} for g in groups}


def kept_shares(runs, groups, budgets) -> dict:
  """{budget: {policy: {group: {metric: [share, low, high]}}}} over one or several runs' request
  policy studies (deploy.policies.kept_share)."""
  def point(rp, policy, budget):
    return next(p for p in rp["points"] if p["policy"] == policy and p["budget"] == budget)
  out = {}
  for budget in budgets:
    out[str(budget)] = {}
    for policy in ("every_k", "drift", "learned"):
      per = out[str(budget)][policy] = {}
      for g in groups:
        per[g] = {}
        for k in runs[0]["metrics"]:
          triples = [tuple(point(rp, p, b)["per_device"][g][k]
                           for p, b in ((policy, budget), ("never", None), ("always", None)))
                     for rp in runs]
          per[g][k] = list(pol.kept_share(triples))
  return out


def run(ev, task, model, params, cfg, methods, costs_, evals, val, groups) -> dict:
  """The deployment studies the config asks for -> results.json's `deployment`."""
  dc = cfg.deploy
  out = {}
  check_names(methods, cfg)
  chosen = studied(methods, costs_, cfg)
  t0 = time.time()
  if dc.encodings:
    out["traffic"] = traffic_study(ev, task, model, params, cfg, chosen, costs_, evals, val,
                                   groups)
  if dc.rollback:
    out["rollback"] = rollback_study(ev, task, params, chosen, evals, val, groups)
  if dc.policy_method:
    m = next(m for m in methods if m.name == dc.policy_method)
    out["request_policies"] = policy_study(ev, task, params, cfg, m, costs_[m.name],
                                           evals[m.name]["hp"], val, groups)
  logging.info("deployment studies done in %.1fs", time.time() - t0)
  return out
