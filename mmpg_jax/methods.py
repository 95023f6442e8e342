"""The method interface every method family builds against.

A `Method` has a grid of hyper-parameter settings (selected on validation devices only), a
pure per-device `adapt(params, device, hp) -> params` run on encoded features (vmapped over
devices by the evaluator), optionally `rescore(params, device, hp, scores) -> scores` (a
forward-only correction of the outputs), and `cost(hp)`: what one device pays for it.

A method family is a module (or package) under mmpg_jax/adapt/ with `build(ctx) -> [Method]`,
ctx a `MethodContext`, and optionally `validate_config(cfg, task, model, abstract_params)`
(called before any work) and `report_lines(results, task) -> [str]` (its own sections of
report.md).
"""
import dataclasses
from typing import Any, Callable

from mmpg_jax import costs


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  grid: tuple                       # of dicts; more than one = chosen on validation devices
  adapt: Callable                   # (params, device_feats, hp) -> params, pure
  cost: Callable                    # hp -> costs.DeviceCost
  uses: tuple = ()                  # roles of the device data the method reads
  diagnostics: dict = dataclasses.field(default_factory=dict)   # name -> f(device) -> scalar
  # (or -> {name: scalar}: several values from one computation)
  per_device_diagnostics: tuple = ()  # diagnostics kept device by device in results.json
  info: dict = dataclasses.field(default_factory=dict)          # copied into results.json
  rescore: Callable | None = None   # (params, device, hp, scores) -> scores, forward only
  # Where the grid is chosen: "validation" devices, or "val_ood" (the held-out shift family)
  # for a choice made for robustness; falls back to validation without val_ood devices.
  select_on: str = "validation"
  # A method whose cloud keeps state across time (persona.Stream: init, adapt, refine): the
  # evaluator serves the entries of each window position in time order and refines the state
  # between positions. `adapt` above is then the method without refinement.
  stream: Any = None


@dataclasses.dataclass
class MethodContext:
  """What every method family builds from."""
  task: Any
  model: Any
  params: Any                       # the global device model
  cost_model: costs.CostModel
  config: Any
  source_prior: Any                 # the cloud's label prior, or None
  val: dict                         # encoded validation devices (selection only)
  workdir: str
  metrics: Any                      # workdir.MetricsWriter
  extra: dict = dataclasses.field(default_factory=dict)   # families' extra results.json fields
  # What one family computes and a later family of the same run reuses (e.g. the FDA's
  # reference set): computed once per run, never written anywhere.
  shared: dict = dataclasses.field(default_factory=dict)


def grid(**axes):
  """Every combination of the axes' values, as a tuple of hp dicts (the first axis slowest)."""
  out = [{}]
  for k in axes:
    out = [dict(g, **{k: v}) for g in out for v in axes[k]]
  return tuple(out)
