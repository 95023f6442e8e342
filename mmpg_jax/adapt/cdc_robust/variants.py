"""cdc_robust's robustness variants, each a registered builder (registry.py). Every variant
starts from the plain cdc_mmpg round trip and keeps its promise: no backward pass and no label
on the device; each grid contains the plain method (scale 0, no gate, zero steps), so
selection can fall back to it."""
import jax
import jax.numpy as jnp

from mmpg_jax.adapt.cdc_robust.cloud import cloud_refine, cloud_samples_upload, sample_bytes
from mmpg_jax.adapt.cdc_robust.registry import Built, register
from mmpg_jax.core import params as P
from mmpg_jax.fda import reference as reference_lib
from mmpg_jax.ondevice import device
from mmpg_jax.training.methods import Seen, grid


def scale_edit(edit, g):
  """g x the edit (a low-rank delta scales its left factor)."""
  def one(d):
    return P.LowRankDelta(d.a * g, d.b) if isinstance(d, P.LowRankDelta) else d * g
  return jax.tree.map(one, edit, is_leaf=lambda x: isinstance(x, P.LowRankDelta))


def with_em2(env, first, first_cost, first_grid) -> Built:
  """A second forward round on the device after `first`: every label group of its context
  asked once more of the edited model, and EM's remaining label shift applied as scale x
  log-ratio on the label bias."""
  ec = env.cfg.baselines.prior_em
  source = jnp.asarray(env.ctx.source_prior)

  def adapt(params, dev, hp):
    return device.label_shift_correction(env.task, env.model, first(params, dev, hp), dev,
                                         source, iterations=ec.iterations,
                                         smoothing=hp["smoothing"], scale=hp["scale"])

  def cost(hp):
    c = first_cost(hp)
    c.device_flops += env.cm.label_shift(env.n_ctx, ec.iterations)
    return c
  second = grid(scale=tuple(env.rc.em2_scales), smoothing=tuple(ec.smoothing))
  return Built(adapt, cost, tuple(dict(a, **b) for a in first_grid for b in second))


@register("em2", label_groups=True)
def em2(env):
  return with_em2(env, lambda params, dev, hp: env.plain(params, dev), env.base_cost, ({},))


@register("gate")
def gate(env):
  """The edit scaled by exp(-max(0, d - 1) / tau), d the upload's domain-code distance to the
  nearest meta-training device in units of their typical spacing (tau = 0: no gate)."""
  def adapt(params, dev, hp):
    edit, aux = env.generated(params, dev)
    d = reference_lib.code_distance(env.reference, aux["code"])[0]
    tau = hp["temperature"]
    g = jnp.where(tau > 0, jnp.exp(-jnp.maximum(d - 1.0, 0.0) / jnp.maximum(tau, 1e-9)), 1.0)
    return P.apply_edit(params, scale_edit(edit, g), env.clip)
  return Built(adapt, env.base_cost, grid(temperature=tuple(env.rc.gate_temperatures)))


@register("cloud_tent")
def cloud_tent(env):
  """The cloud takes `steps` Adam steps of the entropy on the first `cloud_samples` context
  samples' uploaded features, from the edited model, and ships the refined leaves too."""
  rc, m = env.rc, env.rc.cloud_samples
  loss_fn = device.objective(env.task, env.model, "entropy")
  refined_bytes = P.tree_size(P.split(env.params, rc.cloud_leaves)[1]) * env.dbytes
  per_sample = sample_bytes(env.task, env.model, env.params, env.dbytes)

  def adapt(params, dev, hp):
    edited = env.plain(params, dev)           # device: upload, (cloud: FDA edit), merge
    feats = cloud_samples_upload(env.task, dev, m)                    # device: upload
    return cloud_refine(loss_fn, edited, rc.cloud_leaves, feats, hp)  # cloud: refine

  def cost(hp):
    c = env.base_cost(hp)
    c.uplink_bytes += m * per_sample
    if hp["steps"]:
      c.downlink_bytes += refined_bytes
      c.cloud_flops += hp["steps"] * env.cm.step(m, rc.cloud_leaves, "entropy", "adam")
      # backpropagation, on the cloud, through features the device uploaded
      c.cloud_backward_passes += m * hp["steps"]
    return c
  return Built(adapt, cost, grid(lr=tuple(rc.cloud_learning_rates), steps=tuple(rc.cloud_steps)))


def _wide_seen(shifts):
  return lambda cfg: Seen(meta_devices=int(cfg.fda.meta_devices), shifts=shifts)


def _own_fda(name):
  """The plain round trip with the FDA variant `name` meta-trained on its own data."""
  def build(env):
    if name not in env.other:           # its FDA was not trained (bench, tests)
      return None
    wide = env.other[name]
    return Built(lambda params, dev, hp: env.plain(params, dev, wide), env.base_cost)
  return build


register("wide", seen=_wide_seen("wide_data"))(_own_fda("wide"))
register("wide_mix", seen=_wide_seen("training + wide_data (mixture)"))(_own_fda("wide_mix"))
register("wide_text", seen=_wide_seen("wide_data + caption noise"))(_own_fda("wide_text"))


def _two_fdas_and_router(cfg) -> Seen:
  return Seen(meta_devices=2 * int(cfg.fda.meta_devices)
              + int(cfg.cdc_robust.router.meta_devices),
              shifts="training + wide_data (mixture)")


@register("routed", needs=(("wide", "'routed' mixes the plain and the 'wide' FDA's edits"),),
          seen=_two_fdas_and_router)
def routed(env):
  if not env.has_routed:                # its FDAs were not trained (bench, tests)
    return None
  rt, params = env.routed, env.params
  # The wide expert's weight per device: does the router send unseen shifts to it?
  return Built(rt.adapt, rt.cost, rt.grid,
               {"route_wide": lambda dev: rt.generate(params, dev)[1]["weights"][1]})


@register("routed_em2", label_groups=True, seen=_two_fdas_and_router,
          needs=(("routed", "'routed_em2' builds on 'routed''s experts"),))
def routed_em2(env):
  if not env.has_routed:
    return None
  return with_em2(env, env.routed.adapt, env.routed.cost, env.routed.grid)


@register("ensemble", seen=_two_fdas_and_router,
          needs=(("routed", "'ensemble' builds on 'routed''s experts"),))
def ensemble(env):
  """routed's two experts with equal weights, no router (sharpness 0)."""
  if not env.has_routed:
    return None
  rt = env.routed
  return Built(lambda params, dev, hp: rt.adapt(params, dev, {"sharpness": 0.0}), rt.cost)
