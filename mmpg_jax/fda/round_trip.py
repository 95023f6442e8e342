"""The CDC-MMPG round trip of one device: ADR anchors (+ summary) up, FDA edit down, merge.

    device:  context --task.anchor_elements--> ADR --> (anchors, weights) per modality [uplink]
             context --forward + EM--> label-prior log-ratio (label-group tasks)   [uplink]
    cloud:   generate(fda_params, upload) -> edit                                    [downlink]
    device:  params <- apply_edit(params, edit, clip); infer

`device_upload` is what a device computes and sends (an `Upload`), `adapt_device` the whole
round trip for one device (pure; vmap over devices). Shared by every method built on an FDA
(cdc_mmpg and its robustness variants), by its meta-training's validator, by `generate` and
by the benchmarks.
"""
import jax
import jax.numpy as jnp

from mmpg_jax.core import params as P
from mmpg_jax.core.upload import Upload
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.ondevice import adr, costs, device


def fda_and_summary(task, model, params, cfg, source_prior):
  """(the FDA of this config and device model, the device's summary function or None): what
  every reader of an FDA builds first (the families, a finished run, the benchmarks)."""
  fda = fda_lib.from_config(cfg, task, params, source_prior, task.anchor_dims(model, params))
  return fda, device_summary(task, model, cfg, source_prior)


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
  """On the device: its context -> its Upload: anchors and weights per modality (+ summary)."""
  anchors, weights = {}, {}
  elements = task.anchor_elements(dev[task.context_role])
  for i, mod in enumerate(task.anchor_modalities):
    anchors[mod], weights[mod] = adr.select(elements[mod], k, selector, modality_key(key, i))
  return Upload(anchors, weights, None if summary is None else summary(params, dev))


def adapt_device(task, params, fda, fda_params, dev, *, selector, k, clip, key, summary=None):
  """Device: ADR (+ summary) -> cloud: generate -> device: merge. Returns the new params."""
  upload = device_upload(task, params, dev, selector=selector, k=k, key=key, summary=summary)
  return P.apply_edit(params, fda_lib.generate(fda, fda_params, upload), clip)


def device_key(seed, dev):
  """The per-device RNG key of the random selectors."""
  return device.device_key(seed, dev)


def default_upload(task, params, dev, cfg, summary):
  """The default cdc_mmpg upload of a device (selector and K of cfg.adr)."""
  return device_upload(task, params, dev, selector=cfg.adr.selector, k=cfg.adr.k,
                       key=device_key(cfg.seed, dev), summary=summary)


def generated(task, params, fda, fda_params, cfg, summary, dev):
  """(edit, aux) of the default cdc_mmpg upload of a device."""
  return fda.apply({"params": fda_params}, default_upload(task, params, dev, cfg, summary))


def anchor_mmd(dev, task, selector, k, seed, modality):
  """MMD^2 between the anchors a selector picks from a device's context and all its elements."""
  el = task.anchor_elements(dev[task.context_role])
  i = task.anchor_modalities.index(modality)
  a, w = adr.select(el[modality], k, selector, modality_key(device_key(seed, dev), i))
  return adr.mmd2(a, w, el[modality])


def cost_fns(task, model, params, cfg, cm, fda, fda_params, summary):
  """(selector, k) -> (hp -> the DeviceCost of one device's round trip): encoding its context,
  ADR, the summary's forward passes and EM, merging the edit; anchors (+ weights) and the
  summary up, the edit down (at config.comm_dtype). What depends only on the FDA (its edit's
  shape, traced once) is computed here, not per selector and K."""
  n_ctx = cfg.data.context_size
  anchor_dims = task.anchor_dims(model, params)
  n_el = task.num_elements(model, params, n_ctx)
  dbytes = costs.dtype_bytes(cfg.comm_dtype)
  edit_shape = fda_lib.edit_shape(fda, fda_params)
  down = fda_lib.edit_bytes(edit_shape, dbytes)
  summary_floats = fda.summary_dim if summary is not None else 0

  def for_selector(selector, k):
    kk = {m: (n if selector == "all" else k) for m, n in n_el.items()}

    def cost(hp):
      flops = cm.encode(n_ctx) + cm.adr(selector, k) + cm.merge(edit_shape)
      if summary is not None:     # every label group asked of every context sample, + EM
        flops += cm.label_shift(n_ctx, cfg.baselines.prior_em.iterations)
      up = sum(kk[m] * (d + 1) for m, d in anchor_dims.items()) + summary_floats
      return costs.DeviceCost(uplink_bytes=float(up * dbytes), downlink_bytes=float(down),
                              device_flops=flops)
    return cost
  return for_selector
