"""Device cost accounting: FLOPs from XLA's cost analysis of the compiled device-side code.

XLA counts a loop body once whatever its trip count, so costs are composed explicitly:
encoding the inputs once + `steps` x one gradient step + the forward passes a method needs.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax import params as P
from mmpg_jax.adapt import adr, device


def flops(fn, *args) -> float:
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", 0.0))


@dataclasses.dataclass
class DeviceCost:
  uplink_bytes: float = 0.0
  downlink_bytes: float = 0.0
  device_backward_passes: int = 0          # per-sample backward passes (samples x steps)
  device_flops: float = 0.0                # adaptation FLOPs on the device (not inference)
  labels_used_per_device: int = 0

  def as_dict(self):
    return dataclasses.asdict(self)


class CostModel:
  """Measures FLOPs of the device-side pieces for one device of the given data config."""

  def __init__(self, model, params, data_cfg):
    self.model, self.params, self.cfg = model, params, data_cfg
    self._cache = {}

  def _inputs(self, n):
    t, s, q = self.cfg.frames, self.cfg.size, self.cfg.question_len
    return jnp.zeros((n, t, s, s), jnp.uint8), jnp.ones((n, q), jnp.int32)

  def _feats(self, n):
    video, question = self._inputs(n)
    f = jax.eval_shape(lambda p: device.encode(self.model, p, video, question), self.params)
    out = {k: jnp.zeros(v.shape, v.dtype) for k, v in f.items()}
    out["answer"] = jnp.zeros((n,), jnp.int32)
    return out

  def encode(self, n: int) -> float:
    """Running the static encoders on n videos and their questions."""
    key = ("encode", n)
    if key not in self._cache:
      video, question = self._inputs(n)
      self._cache[key] = flops(lambda p, v, q: device.encode(self.model, p, v, q),
                               self.params, video, question)
    return self._cache[key]

  def forward(self, n: int) -> float:
    """The dynamic part's forward pass on n encoded samples."""
    key = ("forward", n)
    if key not in self._cache:
      self._cache[key] = flops(lambda p, f: device.logits(self.model, p, f), self.params,
                               self._feats(n))
    return self._cache[key]

  def step(self, n: int, leaves, objective: str, optimizer: str) -> float:
    """One full-batch gradient step on n encoded samples."""
    key = ("step", n, tuple(leaves), objective, optimizer)
    if key not in self._cache:
      static, dyn = P.split(self.params, leaves)
      opt = device.make_optimizer(optimizer, 1e-3)
      fn = lambda d, s, f: device.finetune_step(self.model, objective, opt, static, d, s, f)
      self._cache[key] = flops(fn, dyn, opt.init(dyn), self._feats(n))
    return self._cache[key]

  def em(self, n: int, iterations: int) -> float:
    key = ("em", n, iterations)
    if key not in self._cache:
      a = jnp.ones((n, self.model.num_answers)) / self.model.num_answers
      prior = jnp.ones((self.model.num_answers,)) / self.model.num_answers
      self._cache[key] = flops(lambda a, s: device.em_prior(a, s, iterations, 1.0), a, prior)
    return self._cache[key]

  def adr(self, selector: str, k: int) -> float:
    """Selecting anchors from the context's frame elements."""
    key = ("adr", selector, k)
    if key not in self._cache:
      n, t = self.cfg.context_size, self.cfg.frames
      d = self.model.embed_dim
      frames = jnp.zeros((n, t, d))
      self._cache[key] = flops(
          lambda f, key: adr.select(adr.frame_elements(f), k, selector, key), frames,
          jax.random.key(0))
    return self._cache[key]

  def merge(self, edit_shape) -> float:
    """Materialising and merging an edit into the device model's parameters."""
    key = ("merge", str(jax.tree.structure(edit_shape)))
    if key not in self._cache:
      edit = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), edit_shape)
      self._cache[key] = flops(lambda p, e: P.apply_edit(p, e, 1.0), self.params, edit)
    return self._cache[key]


def inference_flops_per_sample(cost_model) -> float:
  return (cost_model.encode(1) + cost_model.forward(1))


def dtype_bytes(name: str) -> int:
  return int(np.dtype(name).itemsize)
