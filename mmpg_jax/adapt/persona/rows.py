"""The persona family's methods (rows): duet, persona_single, persona, persona_dynamic and
the ablations, with their device costs."""
import dataclasses

import jax.numpy as jnp
import numpy as np

from mmpg_jax.adapt.persona.prototypes import Stream, median_spacing, refine, refine_personal
from mmpg_jax.ondevice import costs
from mmpg_jax.training.methods import Method, Seen, grid


def ablation(method, of: str, what: str):
  """`method` as an ablation of row `of`, varying `what`."""
  return dataclasses.replace(method, role="ablation", ablation_of=of, varies=what)


def _cost(fam, downlink_floats: float, extra_bytes: int = 0):
  ctx = fam.ctx
  task, cfg = ctx.task, ctx.config
  n_ctx = cfg.data.context_size
  dbytes = costs.dtype_bytes(cfg.comm_dtype)
  mod = task.anchor_modalities[0]
  el_dim = task.anchor_dims(ctx.model, ctx.params)[mod]
  n_el = task.num_elements(ctx.model, ctx.params, n_ctx)[mod]
  return costs.DeviceCost(uplink_bytes=n_el * el_dim * dbytes,
                          downlink_bytes=downlink_floats * dbytes + extra_bytes,
                          device_flops=ctx.cost_model.encode(n_ctx))


def _info(fam):
  task, cfg = fam.ctx.task, fam.ctx.config
  mod = task.anchor_modalities[0]
  return {"real_time_elements": task.num_elements(fam.ctx.model, fam.ctx.params,
                                                  cfg.data.context_size)[mod],
          "adaptive_layers": list(fam.layers.paths)}


def _seen(fam, note=""):
  return Seen(meta_devices=int(fam.ctx.config.persona.meta_devices), shifts="training",
              note=note)


def duet_method(fam, gen_params, name="duet"):
  """Downlink per window: the generated layers, whole."""
  cost = _cost(fam, fam.layers.floats())
  return Method(name, ({},), lambda params, dev, hp: fam.duet_params(gen_params, dev),
                lambda hp: cost, uses=(fam.ctx.task.context_role,), role="ours",
                seen=_seen(fam), info=dict(_info(fam), downlink="the adaptive layers, whole"))


def single_method(fam, ed_params, eps, name="persona_single"):
  cost = _cost(fam, fam.layers.floats())
  return Method(name, ({},), lambda params, dev, hp: fam.single_params(ed_params, dev, eps),
                lambda hp: cost, uses=(fam.ctx.task.context_role,), role="ours",
                seen=_seen(fam), info=dict(_info(fam), epsilon=eps, downlink="the clipped edit"))


PROTOTYPE_ID_BYTES = 4


def persona_method(fam, ed_params, protos, name="persona"):
  """protos: {K: a trained prototype set}; K is a hyper-parameter chosen on validation.
  Downlink per window: the prototype's id and the clipped sample edit; the device holds the K
  prototype edits (downloaded once: `prototype_bank_bytes` in info, per K)."""
  pc = fam.cfg
  dbytes = costs.dtype_bytes(fam.ctx.config.comm_dtype)
  cost = _cost(fam, fam.layers.floats(), PROTOTYPE_ID_BYTES)

  def adapt(params, dev, hp):
    proto = protos[hp["prototypes"]]
    groups, centres = proto["groups"], proto["centres"]
    g, _ = fam.assign(ed_params, groups, centres, dev, hp["assignment"])
    return fam.group_params(ed_params, groups, centres, g, dev)

  return Method(name, grid(assignment=tuple(pc.assignment), prototypes=tuple(sorted(protos))),
                adapt, lambda hp: cost, uses=(fam.ctx.task.context_role,), role="ours",
                seen=_seen(fam), info=dict(_info(fam), prototypes=sorted(protos),
                          cluster_sizes={f"k{k}": [int(s) for s in p["sizes"]]
                                         for k, p in protos.items()},
                          epsilon=pc.epsilon, sample_epsilon=pc.sample_epsilon,
                          prototype_bank_bytes={f"k{k}": k * fam.layers.floats() * dbytes
                                                for k in protos},
                          downlink="prototype id + the clipped sample edit"))


def make_methods(fam, gen_params, ed_params, protos):
  """duet, persona_single, persona and persona_dynamic from trained networks; protos: {K:
  prototype set} for the K values validation chooses among."""
  pc = fam.cfg
  duet = duet_method(fam, gen_params)
  duet = dataclasses.replace(duet, seen=_seen(fam, (
      "heads trained (the released code's never train: duet_frozen_heads); the backbone is "
      "the frozen global model, each head's offset starting at its layer's weights")))
  static = persona_method(fam, ed_params, protos)
  static = dataclasses.replace(static, seen=_seen(fam, (
      "K and the assignment chosen on validation: nearest (k-means of the Stage-A code, ours) "
      "or min_edit (the paper's dynamic inference, also its own row)")))
  methods = [duet, single_method(fam, ed_params, pc.epsilon), static]
  if "min_edit" in pc.assignment and len(pc.assignment) > 1:
    # the paper's rule as a row of its own, beside validation's choice
    methods.append(dataclasses.replace(
        static, name="persona_min_edit",
        grid=grid(assignment=("min_edit",), prototypes=tuple(sorted(protos))),
        seen=_seen(fam, "the paper's dynamic inference: the prototype whose editor needs the "
                        "smallest sample edit")))
  spacing = {k: median_spacing(p["centres"]) for k, p in protos.items()}

  def init(hp, device_ids):
    n = int(np.max(device_ids)) + 1
    centres, sizes = protos[hp["prototypes"]]["centres"], protos[hp["prototypes"]]["sizes"]
    share = jnp.asarray(sizes / max(sizes.sum(), 1), jnp.float32)
    return {"centres": centres, "population": share, "merges": jnp.int32(0),
            "personal": jnp.zeros((n, centres.shape[1]), centres.dtype),
            "owner": jnp.full((n,), -1, jnp.int32)}

  def dyn_adapt(params, dev, hp, state):
    groups = protos[hp["prototypes"]]["groups"]
    g, code = fam.assign(ed_params, groups, state["centres"], dev, hp["assignment"])
    centre = state["centres"][g]
    if hp["scope"] == "device":      # the device's own copy of its prototype, while it stays
      i = dev["device_id"]
      centre = jnp.where(state["owner"][i] == g, state["personal"][i], centre)
    return (fam.params_at(ed_params, groups, centre, g, dev),
            {"code": code, "assign": g, "centre": centre, "device": dev["device_id"]})

  def dyn_refine(state, reports, hp):
    if hp["scope"] == "population":
      return dict(state, **refine(state, reports["code"], reports["assign"], hp["rate"],
                                  pc.merge_ratio * spacing[hp["prototypes"]]))
    return refine_personal(state, reports["centre"], reports["code"], reports["device"],
                           reports["assign"], hp["rate"])

  # A refined prototype no longer matches the device's copy of the bank: the downlink also
  # carries the refined prototype edit (an upper bound: sent every window).
  dyn_cost = _cost(fam, 2 * fam.layers.floats(), PROTOTYPE_ID_BYTES)
  methods.append(dataclasses.replace(
      static, name="persona_dynamic",
      grid=grid(assignment=tuple(pc.assignment), rate=tuple(pc.refine_rates),
                scope=tuple(pc.refine_scopes), prototypes=tuple(sorted(protos))),
      cost=lambda hp: dyn_cost,
      info=dict(static.info, merge_ratio=pc.merge_ratio,
                downlink="prototype id + the clipped sample edit + the refined prototype edit"),
      stream=Stream(init, dyn_adapt, dyn_refine)))
  return methods
