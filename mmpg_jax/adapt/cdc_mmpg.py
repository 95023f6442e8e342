"""CDC-MMPG on a device: ADR anchors up, FDA edit down, merge, forward passes only.

    device:  context frames --ADR--> (anchors, weights)            [uplink]
             context videos --forward + EM--> prior log-ratio      [uplink, 14 floats]
    cloud:   generate(fda_params, anchors, weights, ratio) -> edit [downlink]
    device:  params <- apply_edit(params, edit, clip); infer

`adapt_device` is the whole round trip for one device, pure (vmap over devices). `build`
returns the `cdc_mmpg` method and its ablations (other selectors, a K sweep) as `Method`s.
"""
import functools

import jax
import jax.numpy as jnp

from mmpg_jax import costs
from mmpg_jax import params as P
from mmpg_jax.adapt import adr, device
from mmpg_jax.adapt import fda as fda_lib
from mmpg_jax.adapt.baselines import Method
from mmpg_jax.data import moving_digits as md


def device_anchors(context_frames, selector: str, k: int, key):
  """On the device: frame embeddings [n, T, D] of its context -> (anchors, weights)."""
  return adr.select(adr.frame_elements(context_frames), k, selector, key)


def device_summary(model, cfg, source_prior):
  """The device's forward-only EM estimate of its answer-prior shift (uploaded with the
  anchors), or None when config.fda.use_device_prior is off."""
  if not cfg.fda.use_device_prior:
    return None
  source_prior = jnp.asarray(source_prior)

  def summary(params, context_frames, type_q):
    return device.label_shift_ratio(model, params, context_frames, type_q, source_prior,
                                    md.ANSWER_GROUPS, iterations=cfg.baselines.prior_em.iterations,
                                    smoothing=cfg.fda.device_prior_smoothing)
  return summary


def adapt_device(params, fda, fda_params, context_frames, *, selector, k, clip, key,
                 summary=None, type_q=None):
  """Device: ADR (+ summary) -> cloud: generate -> device: merge. Returns the new params."""
  anchors, weights = device_anchors(context_frames, selector, k, key)
  ratio = None if summary is None else summary(params, context_frames, type_q)
  edit = fda_lib.generate(fda, fda_params, anchors, weights, ratio)
  return P.apply_edit(params, edit, clip)


def device_key(seed, dev):
  """The per-device RNG key of the random selectors (a function of seed and device id)."""
  return jax.random.fold_in(jax.random.key(seed), dev["device_id"])


def anchor_mmd(dev, selector, k, seed):
  el = adr.frame_elements(dev["context"]["frames"])
  a, w = adr.select(el, k, selector, device_key(seed, dev))
  return adr.mmd2(a, w, el)


def build(fda, fda_params, cm, cfg, summary=None):
  """cdc_mmpg (herding, K = cfg.adr.k) and the ablations in cfg.adr. `summary`: see
  `device_summary`."""
  ac = cfg.adr
  n_frames = cfg.data.context_size * cfg.data.frames
  n_el = cfg.data.context_size * (cfg.data.frames - 1)
  anchor_dim = 2 * cfg.model.embed_dim
  dbytes = costs.dtype_bytes(cfg.comm_dtype)
  edit_shape = jax.eval_shape(
      lambda p: fda_lib.generate(fda, p, jnp.zeros((4, anchor_dim)), jnp.full((4,), 0.25)),
      fda_params)
  down = fda_lib.edit_bytes(edit_shape, dbytes)
  n_ctx = cfg.data.context_size
  n_types = len(fda.answer_groups)
  summary_floats = len(fda.source_prior) if summary is not None else 0
  variants = [("cdc_mmpg", ac.selector, ac.k)]
  variants += [(f"cdc_mmpg_{'all_frames' if s == 'all' else s}", s, ac.k) for s in ac.ablations]
  variants += [(f"cdc_mmpg_k{k}", ac.selector, k) for k in ac.k_sweep if k != ac.k]
  methods = []
  for name, selector, k in variants:   # K ranges: config_checks.validate
    kk = n_el if selector == "all" else k

    def adapt(params, dev, hp, selector=selector, k=k):
      return adapt_device(params, fda, fda_params, dev["context"]["frames"], selector=selector,
                          k=k, clip=cfg.fda.clip, key=device_key(cfg.seed, dev), summary=summary,
                          type_q=dev["type_q"])

    def cost(hp, kk=kk, selector=selector, k=k):
      flops = cm.encode(n_ctx) + cm.adr(selector, k) + cm.merge(edit_shape)
      if summary is not None:     # every question type asked of every context video, + EM
        flops += cm.forward(n_ctx * n_types) + 2 * cm.em(n_ctx, cfg.baselines.prior_em.iterations)
      return costs.DeviceCost(
          uplink_bytes=float((kk * (anchor_dim + 1) + summary_floats) * dbytes),
          downlink_bytes=float(down), device_flops=flops)

    diag = functools.partial(anchor_mmd, selector=selector, k=k, seed=cfg.seed)
    methods.append(Method(name, ({},), adapt, cost, uses=("context",),
                          diagnostics={"anchor_mmd2": diag},
                          info={"selector": selector, "k": kk,
                                "frames_in_context": n_frames, "frame_elements": n_el}))
  return methods
