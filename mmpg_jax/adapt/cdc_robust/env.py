"""What every cdc_robust builder reads: the run, the plain FDA, its round trip and its cost,
the FDAs the variants trained (`other`), and the routed mixture's parts (built once, lazily)."""
import dataclasses
import functools
from typing import Callable

import jax

import mmpg_jax.adapt.cdc_robust.router as router_lib
from mmpg_jax.core import params as P
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import reference as reference_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.ondevice import costs
from mmpg_jax.training.methods import grid


@dataclasses.dataclass(frozen=True)
class Routed:
  """The routed mixture of the plain and the wide FDA: its generation, the device's
  adaptation at a sharpness, its cost and its grid."""
  generate: Callable                # (params, dev, sharpness=1.0) -> (edit, aux)
  adapt: Callable                   # (params, dev, hp) -> params
  cost: Callable
  grid: tuple


class Env:
  """The plain FDA's round trip for one run; `other` {'wide': params, ..., 'routed': (router,
  router params)} holds the FDAs the variants meta-trained (a missing one leaves its rows
  out: a caller that only has the plain FDA, e.g. a test, gets the rest)."""

  def __init__(self, ctx, fda, fda_params, summary, other):
    self.ctx, self.task, self.model, self.params = ctx, ctx.task, ctx.model, ctx.params
    self.cfg, self.cm = ctx.config, ctx.cost_model
    self.fda, self.fda_params, self.summary, self.other = fda, fda_params, summary, other
    self.reference = reference_lib.shared(ctx, fda, fda_params, summary)
    self.base_cost = round_trip.cost_fns(self.task, self.model, self.params, self.cfg, self.cm,
                                         fda, fda_params, summary)(self.cfg.adr.selector,
                                                                   self.cfg.adr.k)
    self.rc, self.clip = self.cfg.cdc_robust, self.cfg.fda.clip
    self.dbytes = costs.dtype_bytes(self.cfg.comm_dtype)
    self.n_ctx = self.cfg.data.context_size

  def generated(self, params, dev, fda_params=None):
    """The device's upload and the FDA's edit: (edit, aux)."""
    fp = self.fda_params if fda_params is None else fda_params
    return round_trip.generated(self.task, params, self.fda, fp, self.cfg, self.summary, dev)

  def plain(self, params, dev, fda_params=None):
    """Plain cdc_mmpg's adapted model (with another FDA's parameters if given)."""
    return P.apply_edit(params, self.generated(params, dev, fda_params)[0], self.clip)

  @property
  def has_routed(self) -> bool:
    return "routed" in self.other and "wide" in self.other

  @functools.cached_property
  def routed(self) -> Routed:
    return _routed(self)


def _routed(env) -> Routed:
  task, cfg, fda, cm = env.task, env.cfg, env.fda, env.cm
  r, rp = env.other["routed"]
  experts = (env.fda_params, env.other["wide"])

  def generate(params, dev, sharpness=1.0):
    up = round_trip.default_upload(task, params, dev, cfg, env.summary)
    return router_lib.generate(fda, experts, r, rp, up, sharpness)

  def adapt(params, dev, hp):
    return P.apply_edit(params, generate(params, dev, hp["sharpness"])[0], env.clip)

  up = fda_lib.example_upload(fda, cfg.adr.k)        # a device's upload: K anchors
  edit = jax.eval_shape(lambda: router_lib.generate(fda, experts, r, rp, up)[0])
  down = fda_lib.edit_bytes(edit, env.dbytes)
  # The cloud runs every expert and the router where plain cdc_mmpg runs one FDA
  # (arguments, not closed-over constants, which XLA would fold away at compile time).
  cloud = (costs.flops(lambda e, p, u: router_lib.generate(fda, e, r, p, u), experts, rp, up)
           - costs.flops(lambda p, u: fda.apply({"params": p}, u), env.fda_params, up))
  merge = cm.merge(edit) - cm.merge(fda_lib.edit_shape(fda, env.fda_params))

  def cost(hp):
    c = env.base_cost(hp)
    c.downlink_bytes, c.cloud_flops = float(down), c.cloud_flops + cloud
    c.device_flops += merge
    return c
  return Routed(generate, adapt, cost, grid(sharpness=tuple(env.rc.router_sharpness)))
