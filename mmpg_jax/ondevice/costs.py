"""Device cost accounting: FLOPs and peak memory from XLA's analyses of the compiled
device-side code.

XLA counts a loop body once whatever its trip count, so costs are composed explicitly:
encoding the inputs once + `steps` x one gradient step + the forward passes a method needs.
Each measured program's FLOPs come back as `Flops`, a float that also carries the program's
working set: the memory it needs beyond its inputs (XLA's memory analysis: temporaries +
outputs - outputs aliased to inputs). Summing or scaling FLOPs keeps the largest working set of
the programs summed (they run one after another), so a method's `DeviceCost(device_flops=...)`
knows its largest working set without any family saying so. A device's peak memory is then its
resident model plus the largest working set of anything it runs, inference included
(`DeviceCost.with_device_memory`). The model is counted once whether a program takes it as an
argument or closes over it as a constant.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.core import params as P
from mmpg_jax.ondevice import adr, device


class Flops(float):
  """A FLOP count that remembers the largest working set (bytes) of the programs it counts:
  arithmetic with numbers gives a Flops whose working set is the largest of its operands'
  (programs run one after another, so their working sets do not add)."""

  def __new__(cls, value=0.0, working: float = 0.0):
    out = super().__new__(cls, value)
    out.working = float(working)
    return out

  def _op(self, other, result):
    return Flops(result, max(self.working, getattr(other, "working", 0.0)))

  def __add__(self, o):
    return self._op(o, float(self) + float(o))

  __radd__ = __add__

  def __sub__(self, o):
    return self._op(o, float(self) - float(o))

  def __rsub__(self, o):
    return self._op(o, float(o) - float(self))

  def __mul__(self, o):
    return self._op(o, float(self) * float(o))

  __rmul__ = __mul__

  def __reduce__(self):
    return (Flops, (float(self), self.working))


def working_bytes(compiled) -> float:
  """XLA's memory analysis of a compiled program: what it allocates beyond its inputs."""
  m = compiled.memory_analysis()
  if m is None:
    return 0.0
  return float(m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def flops(fn, *args) -> Flops:
  compiled = jax.jit(fn).lower(*args).compile()
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return Flops((ca or {}).get("flops", 0.0), working_bytes(compiled))


@dataclasses.dataclass
class DeviceCost:
  uplink_bytes: float = 0.0
  downlink_bytes: float = 0.0
  device_backward_passes: int = 0          # per-sample backward passes (samples x steps)
  device_flops: float = 0.0                # adaptation FLOPs on the device (not inference)
  # the largest working set of the adaptation's device programs (bytes; from the Flops they
  # were counted with), then, set by the main job, the device's peak memory: the resident model
  # + the largest working set of adaptation and inference (`with_device_memory`)
  device_peak_bytes: float = 0.0
  labels_used_per_device: int = 0
  cloud_flops: float = 0.0                 # per-device compute in the cloud beyond generation
  cloud_backward_passes: int = 0           # per-sample backward passes the cloud runs on the
                                           # device's uploaded data (samples x steps)

  def as_dict(self):
    d = dataclasses.asdict(self)
    d["device_peak_bytes"] = max(float(self.device_peak_bytes),
                                 getattr(self.device_flops, "working", 0.0))
    return {k: (float(v) if isinstance(v, float) else v) for k, v in d.items()}

  def with_device_memory(self, model_bytes: float, inference_working: float) -> "DeviceCost":
    """The device's peak memory: its resident model + the largest working set of what it runs
    (the adaptation's programs and inference)."""
    working = max(self.as_dict()["device_peak_bytes"], float(inference_working))
    return dataclasses.replace(self, device_peak_bytes=float(model_bytes) + working)


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
  return float(cost_model.encode(1) + cost_model.forward(1))


def inference_working_bytes(cost_model, n: int) -> float:
  """The working set of inference on a batch of n samples (encode, then the dynamic part)."""
  return (cost_model.encode(n) + cost_model.forward(n)).working


def dtype_bytes(name: str) -> int:
  return int(np.dtype(name).itemsize)
