"""Device cost accounting: FLOPs from XLA's cost analysis of the compiled device-side code.

XLA counts a loop body once whatever its trip count, so costs are composed explicitly:
encoding the inputs once + `steps` x one gradient step + the forward passes a method needs.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax import params as P
from mmpg_jax import adr, device


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
  cloud_flops: float = 0.0                 # per-device compute in the cloud beyond generation
  cloud_backward_passes: int = 0           # per-sample backward passes the cloud runs on the
                                           # device's uploaded data (samples x steps)

  def as_dict(self):
    return dataclasses.asdict(self)


class CostModel:
  """Measures FLOPs of the device-side pieces of a task for one device."""

  def __init__(self, task, model, params):
    self.task, self.model, self.params = task, model, params
    self.cfg = task.config.data
    self._cache = {}

  def _feats(self, n):
    return self.task.example_features(self.model, self.params, n)

  def encode(self, n: int) -> float:
    """Running the static encoders on n samples."""
    key = ("encode", n)
    if key not in self._cache:
      self._cache[key] = flops(lambda p, *x: self.task.encode(self.model, p, *x), self.params,
                               *self.task.example_inputs(n))
    return self._cache[key]

  def forward(self, n: int) -> float:
    """The dynamic part's forward pass on n encoded samples."""
    key = ("forward", n)
    if key not in self._cache:
      self._cache[key] = flops(lambda p, f: self.task.scores(self.model, p, f), self.params,
                               self._feats(n))
    return self._cache[key]

  def label_posteriors(self, n: int) -> float:
    """Every label group's posteriors on n context samples, as the task computes them
    (`task.label_posteriors`: what a question-free part shares, it runs once per sample)."""
    key = ("label_posteriors", n)
    if key not in self._cache:
      dev = {self.task.context_role: self._feats(n),
             **self.task.device_constants(self.model, self.params)}
      self._cache[key] = flops(lambda p, d: self.task.label_posteriors(self.model, p, d),
                               self.params, dev)
    return self._cache[key]

  def label_shift(self, n: int, iterations: int) -> float:
    """The EM label-shift estimate on n context samples (`device.label_shift_ratio`): every
    group's posteriors, then the groups' EMs, which cover the labels once."""
    return self.label_posteriors(n) + self.em(n, iterations)

  def step(self, n: int, leaves, objective: str, optimizer: str) -> float:
    """One full-batch gradient step on n encoded samples."""
    key = ("step", n, tuple(leaves), objective, optimizer)
    if key not in self._cache:
      static, dyn = P.split(self.params, leaves)
      opt = device.make_optimizer(optimizer, 1e-3)
      loss_fn = device.objective(self.task, self.model, objective)
      fn = lambda d, s, f: device.finetune_step(loss_fn, opt, static, d, s, f)
      self._cache[key] = flops(fn, dyn, opt.init(dyn), self._feats(n))
    return self._cache[key]

  def em(self, n: int, iterations: int) -> float:
    key = ("em", n, iterations)
    if key not in self._cache:
      a = max(hi for _, hi in self.task.label_groups)
      probs = jnp.ones((n, a)) / a
      prior = jnp.ones((a,)) / a
      self._cache[key] = flops(lambda x, s: device.em_prior(x, s, iterations, 1.0), probs, prior)
    return self._cache[key]

  def adr(self, selector: str, k: int) -> float:
    """Selecting anchors from the context's elements (every modality)."""
    key = ("adr", selector, k)
    if key not in self._cache:
      def select_all(ctx, key):
        return [adr.select(el, k, selector, key)
                for el in self.task.anchor_elements(ctx).values()]
      self._cache[key] = flops(select_all, self._feats(self.cfg.context_size),
                               jax.random.key(0))
    return self._cache[key]

  def merge(self, edit_shape) -> float:
    """Materialising and merging an edit into the device model's parameters."""
    key = ("merge", str(jax.tree.structure(edit_shape)),      # shapes too: the rank differs
           tuple(tuple(s.shape) for s in jax.tree.leaves(edit_shape)))
    if key not in self._cache:
      edit = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), edit_shape)
      self._cache[key] = flops(lambda p, e: P.apply_edit(p, e, 1.0), self.params, edit)
    return self._cache[key]


def inference_flops_per_sample(cost_model) -> float:
  return (cost_model.encode(1) + cost_model.forward(1))


def dtype_bytes(name: str) -> int:
  return int(np.dtype(name).itemsize)
