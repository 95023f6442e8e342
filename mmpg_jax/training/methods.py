"""The method interface every method family builds against.

A `Method` has a grid of hyper-parameter settings (selected on validation devices only), a
pure per-device `adapt(params, device, hp) -> params` run on encoded features (vmapped over
devices by the evaluator), optionally `rescore(params, device, hp, scores) -> scores` (a
forward-only correction of the outputs), and `cost(hp)`: what one device pays for it.

A method family is a module (or package) under mmpg_jax/adapt/ with `build(ctx) -> [Method]`,
ctx a `MethodContext`, and optionally `validate_config(cfg, task, model, abstract_params)`
(called before any work) and `report_lines(results, task, workdir) -> [str]` (its own sections
of report.md).

What a row *is* in the protocol is typed, never a free-form key: its `role` (ROLES), the row it
is an ablation of, what the cloud trained it on (`Seen`), and where its grid is chosen
(`select_on`). The report and the comparisons read these fields (results.json carries them),
so a new rival or control appears in every table without touching generic code. `info` keeps
a family's own facts (an ADR selector and K, a prototype bank's size) for its own sections.
"""
import dataclasses
from typing import Any, Callable

from mmpg_jax.core.protocol import ROLES, SELECT_ON
from mmpg_jax.ondevice import costs


@dataclasses.dataclass(frozen=True)
class Seen:
  """What the cloud trained a row on beyond the global model's data (the device's own labels
  are the cost's `labels_used_per_device`)."""
  meta_devices: int = 0             # labelled simulated devices behind the row
  shifts: str = "–"                 # the shift families they were drawn from
  note: str = ""                    # where the row departs from its paper, in words

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


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
  role: str = "baseline"            # one of ROLES
  ablation_of: str = ""             # an ablation's row (role "ablation" only)
  varies: str = ""                  # what the ablation changes, in words
  seen: Seen = Seen()
  family: str = ""                  # the family that built it (set by the main job)

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"Method {self.name!r}: role {self.role!r} is not one of {ROLES}")
    if (self.role == "ablation") != bool(self.ablation_of):
      raise ValueError(f"Method {self.name!r}: an ablation names the row it varies "
                       f"(ablation_of), and only an ablation does")
    if self.select_on not in SELECT_ON:
      raise ValueError(f"Method {self.name!r}: select_on {self.select_on!r} is not one of "
                       f"{SELECT_ON}")

  def protocol(self) -> dict:
    """The typed protocol facts results.json keeps for each row."""
    return {"role": self.role, "family": self.family,
            **({"ablation_of": self.ablation_of, "varies": self.varies}
               if self.ablation_of else {}),
            "seen": self.seen.as_dict()}


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
