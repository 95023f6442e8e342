"""CDC-MMPG on a device: ADR anchors up, FDA edit down, merge, forward passes only.

    device:  context --task.anchor_elements--> ADR --> (anchors, weights) per modality [uplink]
             context --forward + EM--> label-prior log-ratio (label-group tasks)   [uplink]
    cloud:   generate(fda_params, upload) -> edit                                    [downlink]
    device:  params <- apply_edit(params, edit, clip); infer

`device_upload` is what a device computes and sends, `adapt_device` the whole round trip for one
device (pure; vmap over devices). `build(ctx)` meta-trains the FDA (meta_train.py) and returns
the `cdc_mmpg` method and its ablations (other selectors, a K sweep) as `Method`s.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmpg_jax import config_checks, costs, meta_train
from mmpg_jax import params as P
from mmpg_jax.adapt import adr, cdc_robust, device, router
from mmpg_jax.adapt import fda as fda_lib
from mmpg_jax.adapt.baselines import Method


def device_summary(task, model, cfg, source_prior):
  """The device's forward-only EM estimate of its label-prior shift (uploaded with the
  anchors), or None (a task without label groups, or config.fda.use_device_prior off)."""
  if not cfg.fda.use_device_prior or not task.label_groups:
    return None
  source_prior = jnp.asarray(source_prior)

  def summary(params, dev):
    return device.label_shift_ratio(task.label_posteriors(model, params, dev), source_prior,
                                    task.label_groups,
                                    iterations=cfg.baselines.prior_em.iterations,
                                    smoothing=cfg.fda.device_prior_smoothing)
  return summary


def modality_key(key, i: int):
  """The random selectors' key for the i-th modality (the primary one uses the device key)."""
  return key if i == 0 else jax.random.fold_in(key, i)


def device_upload(task, params, dev, *, selector, k, key, summary=None):
  """On the device: its context -> {'anchors', 'weights'} per modality (+ 'summary')."""
  anchors, weights = {}, {}
  elements = task.anchor_elements(dev[task.context_role])
  for i, mod in enumerate(task.anchor_modalities):
    anchors[mod], weights[mod] = adr.select(elements[mod], k, selector, modality_key(key, i))
  upload = {"anchors": anchors, "weights": weights}
  if summary is not None:
    upload["summary"] = summary(params, dev)
  return upload


def adapt_device(task, params, fda, fda_params, dev, *, selector, k, clip, key, summary=None):
  """Device: ADR (+ summary) -> cloud: generate -> device: merge. Returns the new params."""
  upload = device_upload(task, params, dev, selector=selector, k=k, key=key, summary=summary)
  return P.apply_edit(params, fda_lib.generate(fda, fda_params, upload), clip)


def device_key(seed, dev):
  """The per-device RNG key of the random selectors (device.device_key)."""
  return device.device_key(seed, dev)


def anchor_mmd(dev, task, selector, k, seed, modality):
  el = task.anchor_elements(dev[task.context_role])
  i = task.anchor_modalities.index(modality)
  a, w = adr.select(el[modality], k, selector, modality_key(device_key(seed, dev), i))
  return adr.mmd2(a, w, el[modality])


def default_upload(task, params, dev, cfg, summary):
  """The default cdc_mmpg upload of a device (selector and K of cfg.adr)."""
  return device_upload(task, params, dev, selector=cfg.adr.selector, k=cfg.adr.k,
                       key=device_key(cfg.seed, dev), summary=summary)


def _generated(task, params, fda, fda_params, cfg, summary, dev):
  """(edit, aux) of the default cdc_mmpg upload of a device."""
  return fda.apply({"params": fda_params}, default_upload(task, params, dev, cfg, summary))


def reference_set(task, model, params, fda, fda_params, cfg, summary):
  """The FDA's domain codes and edits of `cdc_robust.reference_devices` meta devices of the
  distribution it was trained on (ids from 0, as meta-training drew them), with their typical
  spacing (median distance of a code to its nearest other code): the yardstick of how far an
  evaluated device's upload lies from anything meta-training saw, and what the controls (mean
  edit, nearest device's edit) are made of. {'codes' [R, C], 'edits' (stacked), 'spacing'}."""
  fc = cfg.fda
  ids = np.arange(min(cfg.cdc_robust.reference_devices, fc.meta_devices))
  pool = meta_train.encode_devices(task, model, params, ids, fc.meta_query_size,
                                   what="reference meta devices")
  consts = task.device_constants(model, params)

  @jax.jit
  def generate(pool_ctx, ids):
    def one(ctx, i):
      dev = {task.context_role: ctx, "device_id": i, **consts}
      edit, aux = _generated(task, params, fda, fda_params, cfg, summary, dev)
      return edit, aux["code"]
    return jax.vmap(one)(pool_ctx, ids)

  edits, ref = generate(pool[task.context_role], jnp.asarray(ids, jnp.int32))
  d = jnp.sqrt(jnp.maximum(adr._sq_dists(ref, ref), 0.0)) + jnp.eye(len(ids)) * 1e30
  spacing = jnp.median(d.min(1)) if len(ids) > 1 else jnp.float32(1.0)
  return {"codes": ref, "edits": edits, "spacing": spacing}


def code_distance(reference, code):
  """(distance of a code to the nearest reference code in units of their spacing, its index)."""
  d2 = jnp.sum(jnp.square(reference["codes"] - code), -1)
  i = jnp.argmin(d2)
  return jnp.sqrt(d2[i]) / reference["spacing"], i


def diagnostics(task, params, fda, fda_params, cfg, summary, reference):
  """Per-device diagnosis of the default cdc_mmpg edit: a function of an evaluated device
  returning, from one generation, edit_norm (Frobenius norm of the change the edit makes, after
  the clip), code_distance (distance of the device's FDA code to the nearest meta-training
  device's code, in units of their typical spacing) and, for label-group tasks with
  `query_label_prior`, the total variation from the device's true query label prior of the
  FDA's anchor-EM prior (fda_prior_tv), of the device's own EM summary (device_prior_tv), and of
  the source prior (shift_tv, the true shift)."""
  with_prior = bool(fda.label_groups) and hasattr(task, "query_label_prior")
  src = jnp.asarray(fda.source_prior, jnp.float32)

  def tv(log_ratio, truth):
    err = 0.0
    for lo, hi in fda.label_groups:
      s = src[lo:hi] / src[lo:hi].sum()
      p = s * jnp.exp(log_ratio[lo:hi])
      err += 0.5 * jnp.abs(p / p.sum() - truth[lo:hi]).sum()
    return err / len(fda.label_groups)

  def diagnose(dev):
    edit, aux = _generated(task, params, fda, fda_params, cfg, summary, dev)
    merged = P.apply_edit(params, edit, cfg.fda.clip)
    out = {"edit_norm": jnp.sqrt(sum(jnp.sum(jnp.square(a - b)) for a, b in
                                     zip(jax.tree.leaves(merged), jax.tree.leaves(params)))),
           "code_distance": code_distance(reference, aux["code"])[0]}
    if with_prior:
      truth = task.query_label_prior(dev)
      out["fda_prior_tv"] = tv(aux["prior_ratio"], truth)
      out["shift_tv"] = tv(jnp.zeros_like(src), truth)
      if summary is not None:
        out["device_prior_tv"] = tv(summary(params, dev), truth)
    return out

  return diagnose


def validate_config(cfg, task, model, abstract_params) -> None:
  """The cdc_mmpg config blocks (fda, adr) against the task's anchor elements and the edited
  layers; ConfigError names the key (called by config_checks.check before any work)."""
  for key in ("fda.learning_rate", "fda.num_steps", "fda.devices_per_step", "fda.meta_devices",
              "fda.rank", "fda.clip", "fda.checkpoint_every", "fda.eval_every",
              "fda.log_every"):
    config_checks.positive(cfg, key)
  config_checks.need(cfg.fda.meta_devices >= cfg.fda.devices_per_step, "fda.meta_devices",
                     cfg.fda.meta_devices, f"at least fda.devices_per_step "
                     f"({cfg.fda.devices_per_step}) meta devices, one step's batch")
  num_elements = task.num_elements(model, abstract_params, cfg.data.context_size)
  n_el = min(num_elements.values())
  where = ", ".join(f"{m}: {n}" for m, n in num_elements.items())
  a, need = cfg.adr, config_checks.need
  for key, k in [("adr.k", a.k)] + [("adr.k_sweep", k) for k in a.k_sweep]:
    need(1 <= k <= n_el, key, k, f"K must be between 1 and the {n_el} anchor elements of a "
         f"device's context ({where}; data.context_size={cfg.data.context_size})")
  for k in cfg.fda.train_ks:
    need(0 <= k <= n_el, "fda.train_ks", cfg.fda.train_ks,
         f"each K in 0..{n_el} (0 = all anchor elements; {where})")
  for sel in (a.selector,) + tuple(a.ablations):
    need(sel in adr.SELECTORS, "adr.selector/ablations", sel, f"known: {adr.SELECTORS}")
  flat = P.flatten(abstract_params)
  cdc_robust.validate_config(cfg, task)
  if "cloud_tent" in cfg.cdc_robust.variants:   # its leaves matter only when it runs
    P.select(abstract_params, cfg.cdc_robust.cloud_leaves)
  for path in P.select(abstract_params, cfg.fda.edit_leaves):
    shape = flat[path].shape
    if len(shape) >= 2 and int(np.prod(shape)) > cfg.fda.full_delta_max:
      rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
      need(cfg.fda.rank <= min(rows, cols), "fda.rank", cfg.fda.rank,
           f"larger than layer {path} ({rows} x {cols}); a rank-r edit of it needs "
           f"r <= {min(rows, cols)}")


def build(ctx):
  """Meta-trains (or reloads) the FDA, then its methods (`make_methods`)."""
  task, model, params, cfg = ctx.task, ctx.model, ctx.params, ctx.config
  fda = fda_lib.from_config(cfg, task, params, ctx.source_prior,
                            task.anchor_dims(model, params))
  summary = device_summary(task, model, cfg, ctx.source_prior)
  fda_params, fda_summary = meta_train.train_fda(task, model, fda, params, cfg, ctx.val,
                                                 ctx.workdir, ctx.metrics, summary)
  logging.info("FDA ready (%s)", fda_summary)
  ctx.extra["fda"] = {**fda_summary, "params": P.tree_size(fda_params)}
  other = {}
  for name, overrides in cdc_robust.wide_overrides(cfg).items():
    # The same FDA meta-trained over a wider shift distribution (never the OOD-only ranges):
    # `wide` draws every meta device from it, `wide_mix` a fraction (the rest as training's).
    other[name], wide_summary = meta_train.train_fda(
        task.with_data(overrides), model, fda, params, cfg, ctx.val,
        ctx.workdir, ctx.metrics, summary, stage=f"fda_{name}")
    ctx.extra[f"fda_{name}"] = wide_summary
  if "routed" in cfg.cdc_robust.variants:
    # A router over the frozen plain and wide FDAs, meta-trained on the mixture.
    r, rp, router_summary = router.train(
        task.with_data(cdc_robust.mix_overrides(cfg)), model, fda, (fda_params, other["wide"]),
        params, cfg, ctx.val, ctx.workdir, ctx.metrics, summary)
    other["routed"] = (r, rp)
    ctx.extra["router"] = router_summary
  return make_methods(ctx, fda, fda_params, summary, other)


def make_methods(ctx, fda, fda_params, summary=None, other_fda_params=None):
  """cdc_mmpg (selector cfg.adr.selector, K = cfg.adr.k), the ablations in cfg.adr and the
  variants and controls of cfg.cdc_robust (cdc_robust.py), for a given FDA and its
  parameters (`other_fda_params`: {variant: params} of the same FDA trained otherwise, and
  'routed': (router, its params))."""
  task, model, params, cfg, cm = ctx.task, ctx.model, ctx.params, ctx.config, ctx.cost_model
  ac = cfg.adr
  anchor_dims = task.anchor_dims(model, params)
  n_ctx = cfg.data.context_size
  n_el = task.num_elements(model, params, n_ctx)
  dbytes = costs.dtype_bytes(cfg.comm_dtype)
  edit_shape = fda_lib.edit_shape(fda, fda_params)
  down = fda_lib.edit_bytes(edit_shape, dbytes)
  n_groups = len(task.label_groups)
  summary_floats = fda.summary_dim if summary is not None else 0
  primary = next(iter(anchor_dims))
  variants = [("cdc_mmpg", ac.selector, ac.k)]
  variants += [(f"cdc_mmpg_{'all_frames' if s == 'all' else s}", s, ac.k) for s in ac.ablations]
  variants += [(f"cdc_mmpg_k{k}", ac.selector, k) for k in ac.k_sweep if k != ac.k]
  reference = reference_set(task, model, params, fda, fda_params, cfg, summary)
  methods = []
  for name, selector, k in variants:   # K ranges: validate_config
    kk = {m: (n if selector == "all" else k) for m, n in n_el.items()}

    def adapt(params, dev, hp, selector=selector, k=k):
      return adapt_device(task, params, fda, fda_params, dev, selector=selector, k=k,
                          clip=cfg.fda.clip, key=device_key(cfg.seed, dev), summary=summary)

    def cost(hp, kk=kk, selector=selector, k=k):
      flops = cm.encode(n_ctx) + cm.adr(selector, k) + cm.merge(edit_shape)
      if summary is not None:     # every label group asked of every context sample, + EM
        flops += cm.forward(n_ctx * n_groups) + 2 * cm.em(n_ctx, cfg.baselines.prior_em.iterations)
      up = sum(kk[m] * (d + 1) for m, d in anchor_dims.items()) + summary_floats
      return costs.DeviceCost(uplink_bytes=float(up * dbytes), downlink_bytes=float(down),
                              device_flops=flops)

    diags = {"anchor_mmd2" + ("" if m == primary else f"_{m}"): functools.partial(
        anchor_mmd, task=task, selector=selector, k=k, seed=cfg.seed, modality=m)
             for m in anchor_dims}
    info = {"selector": selector, "k": kk[primary]}
    info.update(task.anchor_info(cfg))
    info.update({f"k_{m}": kk[m] for m in kk if m != primary})
    if name == "cdc_mmpg":
      info["reference_devices"] = int(reference["codes"].shape[0])
      diags["diagnosis"] = diagnostics(task, params, fda, fda_params, cfg, summary, reference)
      base_cost = cost
    methods.append(Method(name, ({},), adapt, cost, uses=(task.context_role,),
                          diagnostics=diags, info=info))
  return methods + cdc_robust.build(ctx, fda, fda_params, summary, reference, base_cost,
                                    other_fda_params or {})
