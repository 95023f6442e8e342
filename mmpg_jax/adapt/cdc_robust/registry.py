"""The registry of cdc_robust's rows: each variant or control is a `Variant` whose builder
turns the shared `Env` (the plain FDA, its round trip and costs) into a row's parts.

Adding a variant: write a builder of ~30 lines in variants.py (or controls.py), decorate it
with `@register(name, ...)` stating what the row saw and where its grid is chosen, and list
the name in `config.cdc_robust.variants`. Nothing else dispatches on names."""
import dataclasses
from typing import Callable

from mmpg_jax.training.methods import Seen


@dataclasses.dataclass(frozen=True)
class Built:
  """A row's parts: the device's adaptation, its cost, its grid, its diagnostics."""
  adapt: Callable
  cost: Callable
  grid: tuple = ({},)
  diagnostics: dict = dataclasses.field(default_factory=dict)


def training_seen(cfg) -> Seen:
  """The plain FDA's meta devices, drawn from the training shifts."""
  return Seen(meta_devices=int(cfg.fda.meta_devices), shifts="training")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  build: Callable                   # Env -> Built, or None where its parts were not trained
  role: str = "ours"                # "control": rules an explanation out
  # A robustness variant's choices are made on the validation OOD devices; a control's on
  # validation, like cdc_mmpg's.
  select_on: str = "val_ood"
  uses_upload: bool = True          # False: the device sends nothing (the same edit for all)
  needs: tuple = ()                 # ((variant, why), ...) it builds on
  label_groups: bool = False        # built only for LabelGroups tasks
  seen: Callable = training_seen    # cfg -> Seen


REGISTRY: dict = {}


def register(name: str, **fields):
  """Decorator: the builder of row `cdc_mmpg_<name>`."""
  def add(build):
    REGISTRY[name] = Variant(name, build, **fields)
    return build
  return add
