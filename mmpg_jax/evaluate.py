"""Evaluation under one protocol: select on validation devices, then test and OOD devices.

1. The static encoders run once over every video of a split (`encode_split`).
2. For each method and each of its hyper-parameter settings, the per-device adaptation is
   vmapped over chunks of devices; the score is the mean query accuracy on *validation*
   devices. The best setting is then run, unchanged, on the test and OOD devices. Test
   devices are never seen before that final call.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmpg_jax.adapt import device
from mmpg_jax.data import moving_digits as md


def _pad_to(x, n):
  if len(x) == n:
    return x
  pad = np.repeat(x[-1:], n - len(x), axis=0)
  return np.concatenate([x, pad], axis=0)


def type_question_codes(model, params, question_len: int):
  """One canonical question per question type (its first template), encoded: [Q, Dq]."""
  tokens = np.stack([md.tokenize(md.QUESTION_TEMPLATES[t][0], question_len)
                     for t in md.QUESTION_TYPES])
  return np.asarray(model.apply({"params": params}, tokens, method=model.encode_question))


def encode_split(model, params, devices: dict, chunk: int = 512) -> dict:
  """{role: {'frames' [N, n, T, D], 'q' [N, n, Dq], 'qtype', 'answer'?}, 'device_id',
  'type_q' [N, Q, Dq]} for a device split."""
  enc = jax.jit(lambda p, v, q: device.encode(model, p, v, q))
  out = {}
  for role, data in devices.items():
    if not isinstance(data, dict) or "video" not in data:
      continue
    nd, n = data["video"].shape[:2]
    video = data["video"].reshape((nd * n,) + data["video"].shape[2:])
    question = data["question"].reshape(nd * n, -1)
    parts = []
    for s in range(0, nd * n, chunk):
      v, q = video[s:s + chunk], question[s:s + chunk]
      f = enc(params, _pad_to(v, chunk), _pad_to(q, chunk))
      parts.append(jax.tree.map(lambda x: np.asarray(x)[:len(v)], f))
    feats = {k: np.concatenate([p[k] for p in parts]).reshape((nd, n) + parts[0][k].shape[1:])
             for k in parts[0]}
    feats["qtype"] = data["qtype"]
    if "answer" in data:
      feats["answer"] = data["answer"]
    out[role] = feats
  out["device_id"] = np.asarray(devices["device_id"])
  qlen = devices["context"]["question"].shape[-1]
  out["type_q"] = np.repeat(type_question_codes(model, params, qlen)[None],
                            len(out["device_id"]), axis=0)
  return out


def _split_hp(hp):
  """Integers (step counts, k) are static and compile separately; floats are traced."""
  static = tuple(sorted((k, v) for k, v in hp.items() if isinstance(v, (int, np.integer))))
  traced = {k: jnp.float32(v) for k, v in hp.items() if not isinstance(v, (int, np.integer))}
  return static, traced


class Evaluator:

  def __init__(self, model, device_chunk: int = 32):
    self.model = model
    self.chunk = device_chunk
    self._compiled = {}

  def per_device_accuracy(self, method, params, feats, hp) -> np.ndarray:
    static, traced = _split_hp(hp)
    key = (method.name, static)
    if key not in self._compiled:
      def one(params, dev, traced):
        adapted = method.adapt(params, dev, {**dict(static), **traced})
        return device.accuracy(self.model, adapted, dev["query"])
      self._compiled[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, None)))
    fn = self._compiled[key]
    roles = set(method.uses) | {"query"}
    sub = {r: feats[r] for r in roles}
    sub["device_id"] = feats["device_id"]
    sub["type_q"] = feats["type_q"]
    return self._chunked(lambda part: fn(params, part, traced), sub)

  def _chunked(self, fn, sub):
    """fn over fixed-size chunks of devices (padded), so every split compiles once."""
    nd = len(sub["device_id"])
    out = []
    for s in range(0, nd, self.chunk):
      part = jax.tree.map(lambda x: _pad_to(x[s:s + self.chunk], self.chunk), sub)
      out.append(np.asarray(fn(part))[:min(self.chunk, nd - s)])
    return np.concatenate(out)

  def diagnostics(self, method, feats):
    out = {}
    for name, fn in method.diagnostics.items():
      key = (method.name, "diag", name)
      if key not in self._compiled:
        self._compiled[key] = jax.jit(jax.vmap(fn))
      sub = {r: feats[r] for r in set(method.uses)}
      sub["device_id"] = feats["device_id"]
      out[name] = self._chunked(self._compiled[key], sub)
    return out

  def select(self, method, params, val_feats):
    """Best hyper-parameters on validation devices (the only split selection may see)."""
    scores = []
    for hp in method.grid:
      scores.append(float(self.per_device_accuracy(method, params, val_feats, hp).mean()))
    best = int(np.argmax(scores))
    return method.grid[best], scores

  def run(self, methods, params, val_feats, eval_feats: dict):
    """Returns {name: {'hp', 'validation', 'grid_scores', 'per_device': {group: accs}}}."""
    out = {}
    for m in methods:
      t0 = time.time()
      hp, scores = self.select(m, params, val_feats)
      per_group = {g: self.per_device_accuracy(m, params, f, hp) for g, f in eval_feats.items()}
      per_group_diag = {g: self.diagnostics(m, f) for g, f in eval_feats.items()}
      diags = {name: {g: d[name] for g, d in per_group_diag.items()} for name in m.diagnostics}
      out[m.name] = {"hp": hp, "validation": max(scores), "grid_scores": scores,
                     "per_device": per_group, "diagnostics": diags}
      logging.info("%-10s hp=%s val %.4f | %s | %.1fs", m.name, hp, max(scores),
                   " ".join(f"{g} {a.mean():.4f}" for g, a in per_group.items()),
                   time.time() - t0)
    return out
