"""Evaluation under one protocol: select on validation devices, then test and OOD devices.

1. The task's static encoders run once over every sample of a split (`task.encode_split`).
2. For each method and each of its hyper-parameter settings, the per-device adaptation is
   vmapped over chunks of devices and scored with the task's metrics; the setting with the best
   mean *selection metric* (the task's first metric, in its direction) on *validation* devices
   is then run, unchanged, on the test and OOD devices. Test devices are never seen before that
   final call.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmpg_jax.core import timing
from mmpg_jax.ondevice import costs
from mmpg_jax.tasks.base import pad_to
from mmpg_jax.training.methods import Method

# The device model as it is: what a device runs before (or instead of) any edit.
UNCHANGED = Method("unchanged", ({},), lambda params, dev, hp: params,
                   lambda hp: costs.DeviceCost())


def _split_hp(hp):
  """Integers (step counts, k) and strings (a rule's name) are static and compile separately;
  floats are traced."""
  is_static = lambda v: isinstance(v, (int, np.integer, str))
  static = tuple(sorted((k, v) for k, v in hp.items() if is_static(v)))
  traced = {k: jnp.float32(v) for k, v in hp.items() if not is_static(v)}
  return static, traced


def method_metrics(task, model, method, params, dev, hp):
  """One device: adapt, infer on its query role, (re-score), score -> {metric: scalar}."""
  adapted = method.adapt(params, dev, hp)
  query = dev[task.query_role]
  scores = task.scores(model, adapted, query)
  if method.rescore is not None:
    scores = method.rescore(adapted, dev, hp, scores)
  return task.metric_values(scores, query)


class Evaluator:

  def __init__(self, task, model, device_chunk: int = 32):
    self.task, self.model = task, model
    self.chunk = device_chunk
    self._compiled = {}

  def sub(self, roles, feats):
    """Only the given roles of a device split (+ every per-device constant)."""
    return {k: v for k, v in feats.items() if k in roles or k not in self.task.roles}

  def per_device_metrics(self, method, params, feats, hp) -> dict:
    """{metric: [num devices]} for a method with hyper-parameters hp."""
    if method.stream is not None:
      return self.stream_metrics(method, params, feats, hp)
    static, traced = _split_hp(hp)
    key = (method.name, static)
    if key not in self._compiled:
      def one(params, dev, traced):
        return method_metrics(self.task, self.model, method, params, dev,
                              {**dict(static), **traced})
      self._compiled[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, None)))
    fn = self._compiled[key]
    return self.chunked(lambda part: fn(params, part, traced), self.sub(set(method.uses) | {self.task.query_role}, feats))

  def identity_metrics(self, params, feats) -> dict:
    """{metric: [num devices]} of the device model `params` with no adaptation."""
    return self.per_device_metrics(UNCHANGED, params, feats, {})

  def stream_metrics(self, method, params, feats, hp) -> dict:
    """A stateful method (Method.stream) on a split: the cloud serves every entry of window
    position t with the current state, then refines the state with what they reported; t in
    time order (a split without windows is one time step). Each split starts from init."""
    if method.rescore is not None:
      raise ValueError(f"method {method.name!r} sets both stream and rescore; a stream "
                       f"method's adapt gives the parameters it is scored with")
    static, traced = _split_hp(hp)
    key = (method.name, "stream", static)
    full = lambda t: {**dict(static), **t}
    if key not in self._compiled:
      def one(params, dev, traced, state):
        adapted, report = method.stream.adapt(params, dev, full(traced), state)
        query = dev[self.task.query_role]
        return (self.task.metric_values(self.task.scores(self.model, adapted, query), query),
                report)
      self._compiled[key] = (
          jax.jit(jax.vmap(one, in_axes=(None, 0, None, None))),
          jax.jit(lambda state, reports, t: method.stream.refine(state, reports, full(t))))
    fn, refine = self._compiled[key]
    sub = self.sub(set(method.uses) | {self.task.query_role}, feats)
    n = len(sub["device_id"])
    pos = np.asarray(sub["window"]) if "window" in sub else np.zeros(n, np.int32)
    state = method.stream.init(full(traced), np.unique(np.asarray(sub["device_id"])))
    out = {}
    for t in np.unique(pos):
      idx = np.flatnonzero(pos == t)
      part = jax.tree.map(lambda x: np.asarray(x)[idx], sub)
      values, reports = self.chunked(lambda p: fn(params, p, traced, state), part)
      state = refine(state, reports, traced)
      for k, v in values.items():
        out.setdefault(k, np.zeros((n,) + v.shape[1:], v.dtype))[idx] = v
    return out

  def chunked(self, fn, sub):
    """fn over fixed-size chunks of devices (padded), so every split compiles once."""
    nd = len(sub["device_id"])
    out = []
    for s in range(0, nd, self.chunk):
      part = jax.tree.map(lambda x: pad_to(x[s:s + self.chunk], self.chunk), sub)
      out.append(jax.tree.map(lambda x: np.asarray(x)[:min(self.chunk, nd - s)], fn(part)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)

  def diagnostics(self, method, feats):
    out = {}
    for name, fn in method.diagnostics.items():
      key = (method.name, "diag", name)
      if key not in self._compiled:
        self._compiled[key] = jax.jit(jax.vmap(fn))
      # Diagnostics may read the labelled query (to compare with the truth); they never feed
      # back into adaptation or selection.
      values = self.chunked(self._compiled[key],
                             self.sub(set(method.uses) | {self.task.query_role}, feats))
      # A diagnostic may return several named values from one computation.
      out.update(values if isinstance(values, dict) else {name: values})
    return out

  def _score(self, per_device):
    m = self.task.selection_metric
    value = float(per_device[m.name].mean())
    return value if m.higher_is_better else -value

  def select(self, method, params, val_feats):
    """Best hyper-parameters on validation devices (the only split selection may see)."""
    scores = [self._score(self.per_device_metrics(method, params, val_feats, hp))
              for hp in method.grid]
    best = int(np.argmax(scores))
    return method.grid[best], scores

  def run(self, methods, params, val_feats, eval_feats: dict):
    """Returns {name: {'hp', 'validation', 'grid_scores', 'selected_on', 'per_device': {group:
    {metric: values}}, 'diagnostics': {name: {group: values}}[, 'window': {group:
    positions}]}}. Validation scores are signed so that higher is better. A method whose
    `select_on` is "val_ood" is selected on the validation OOD group (eval_feats['val_ood'],
    itself a validation group, reported beside test) where there is one. A split whose entries
    carry a `window` (a stream task: one entry per device and window) gets each entry's
    position."""
    out = {}
    for m in methods:
      with timing.span(m.name):
        out[m.name] = self._evaluate(m, params, val_feats, eval_feats)
    return out

  def _evaluate(self, m, params, val_feats, eval_feats: dict) -> dict:
    """One method's entry of `run`."""
    sel = self.task.selection_metric.name
    t0 = time.time()
    on = "val_ood" if m.select_on == "val_ood" and "val_ood" in eval_feats else "validation"
    hp, scores = self.select(m, params, eval_feats[on] if on == "val_ood" else val_feats)
    per_group = {g: self.per_device_metrics(m, params, f, hp) for g, f in eval_feats.items()}
    per_group_diag = {g: self.diagnostics(m, f) for g, f in eval_feats.items()}
    names = next(iter(per_group_diag.values()), {})
    diags = {name: {g: d[name] for g, d in per_group_diag.items()} for name in names}
    out = {"hp": hp, "validation": max(scores), "grid_scores": scores, "grid": list(m.grid),
           "selected_on": on, "per_device": per_group, "diagnostics": diags}
    # A stream task's entries are (device, window) pairs: the report averages by position.
    windows = {g: np.asarray(f["window"]) for g, f in eval_feats.items() if "window" in f}
    if windows:
      out["window"] = windows
      out["device_id"] = {g: np.asarray(f["device_id"]) for g, f in eval_feats.items()}
    logging.info("%-10s hp=%s val %.4f | %s | %.1fs", m.name, hp, max(scores),
                 " ".join(f"{g} {sel} {v[sel].mean():.4f}" for g, v in per_group.items()),
                 time.time() - t0)
    return out
