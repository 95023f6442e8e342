"""CDC-MMPG (method family `cdc_mmpg`): the FDA's edit for every device, from its anchors.

`build(ctx)` meta-trains the FDA (stage `fda`, fda/stage.py) and returns the `cdc_mmpg`
method (ADR selector and K of config.adr; the device round trip is fda/round_trip.py) and its
ablations: other anchor selectors and a K sweep. Its report section (`report_lines`) diagnoses
where the gain comes from. The robustness variants built on the same FDA are a family of their
own (cdc_robust/).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmpg_jax.adapt import cdc_mmpg_report as cdc_report
from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import need, positive
from mmpg_jax.fda import reference as reference_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.ondevice import adr, costs
from mmpg_jax.tasks.capabilities import KnownLabelPrior
from mmpg_jax.training.methods import Method, Seen

# The per-device diagnoses of the cdc_mmpg row kept device by device in results.json.
DIAGNOSIS = ("edit_norm", "code_distance", "edit_nn_distance", "edit_nn_spread", "fda_prior_tv",
             "device_prior_tv", "shift_tv")


def diagnostics(task, params, fda, fda_params, cfg, summary, reference):
  """Per-device diagnosis of the default cdc_mmpg edit: a function of an evaluated device
  returning, from one generation, edit_norm (Frobenius norm of the change the edit makes, after
  the clip), code_distance (distance of the device's FDA code to the nearest meta-training
  device's code, in units of their typical spacing) and, for label-group tasks with
  a query label prior, the total variation from the device's true query label prior of the
  FDA's anchor-EM prior (fda_prior_tv), of the device's own EM summary (device_prior_tv), and of
  the source prior (shift_tv, the true shift)."""
  with_prior = bool(fda.label_groups) and isinstance(task, KnownLabelPrior)
  src = jnp.asarray(fda.source_prior, jnp.float32)

  def tv(log_ratio, truth):
    err = 0.0
    for lo, hi in fda.label_groups:
      s = src[lo:hi] / src[lo:hi].sum()
      p = s * jnp.exp(log_ratio[lo:hi])
      err += 0.5 * jnp.abs(p / p.sum() - truth[lo:hi]).sum()
    return err / len(fda.label_groups)

  def diagnose(dev):
    edit, aux = round_trip.generated(task, params, fda, fda_params, cfg, summary, dev)
    merged = P.apply_edit(params, edit, cfg.fda.clip)
    out = {"edit_norm": jnp.sqrt(sum(jnp.sum(jnp.square(a - b)) for a, b in
                                     zip(jax.tree.leaves(merged), jax.tree.leaves(params)))),
           "code_distance": reference_lib.code_distance(reference, aux["code"])[0]}
    nn, spread = reference_lib.edit_distance(
        reference, reference_lib.applied_vector(edit, params, cfg.fda.clip))
    out.update(edit_nn_distance=nn, edit_nn_spread=spread)
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
  layers; ConfigError names the key (called before any work)."""
  for key in ("fda.learning_rate", "fda.num_steps", "fda.devices_per_step", "fda.meta_devices",
              "fda.rank", "fda.clip", "fda.checkpoint_every", "fda.eval_every",
              "fda.log_every", "fda.reference_devices"):
    positive(cfg, key)
  bases = tuple(cfg.fda.get("bases", ("global",)))
  fams = tuple(cfg.method_families)
  need(set(bases) <= {"global", "global_meta"} and "global" in bases, "fda.bases", bases,
       "('global',) or ('global', 'global_meta'): the bases the FDA learns to edit")
  need("global_meta" not in bases or ("global_meta" in fams and fams.index("global_meta")
                                      < fams.index("cdc_mmpg")),
       "fda.bases", bases, "'global_meta' edits the data-matched control: list the "
       "'global_meta' family before 'cdc_mmpg' in method_families, or drop it from fda.bases")
  short = task.meta_shortfall(cfg.data.context_size, cfg.fda.meta_query_size)
  need(short is None, "fda.meta_query_size", cfg.fda.meta_query_size, f"{short}: lower them")
  need(cfg.fda.meta_devices >= cfg.fda.devices_per_step, "fda.meta_devices",
                     cfg.fda.meta_devices, f"at least fda.devices_per_step "
                     f"({cfg.fda.devices_per_step}) meta devices, one step's batch")
  num_elements = task.num_elements(model, abstract_params, cfg.data.context_size)
  n_el = min(num_elements.values())
  where = ", ".join(f"{m}: {n}" for m, n in num_elements.items())
  a = cfg.adr
  for key, k in [("adr.k", a.k)] + [("adr.k_sweep", k) for k in a.k_sweep]:
    need(1 <= k <= n_el, key, k, f"K must be between 1 and the {n_el} anchor elements of a "
         f"device's context ({where}; data.context_size={cfg.data.context_size})")
  for k in cfg.fda.train_ks:
    need(0 <= k <= n_el, "fda.train_ks", cfg.fda.train_ks,
         f"each K in 0..{n_el} (0 = all anchor elements; {where})")
  for sel in (a.selector,) + tuple(a.ablations):
    need(adr.is_selector(sel), "adr.selector/ablations", sel, f"known: {adr.SELECTORS}")
  need(a.selector not in a.ablations, "adr.ablations", a.ablations,
       f"an ablation other than the default selector {a.selector!r} (cdc_mmpg is its row)")
  flat = P.flatten(abstract_params)
  for path in P.select(abstract_params, cfg.fda.edit_leaves):
    shape = flat[path].shape
    if len(shape) >= 2 and int(np.prod(shape)) > cfg.fda.full_delta_max:
      rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
      need(cfg.fda.rank <= min(rows, cols), "fda.rank", cfg.fda.rank,
           f"larger than layer {path} ({rows} x {cols}); a rank-r edit of it needs "
           f"r <= {min(rows, cols)}")


def build(ctx):
  """Meta-trains (or resumes, or reloads) the FDA (stage `fda`), then its methods; with
  `fda.bases` holding "global_meta", a second FDA meta-trained to edit the data-matched
  control instead of the global model (stage `fda_on_global_meta`) and its row."""
  task, model, params, cfg = ctx.task, ctx.model, ctx.params, ctx.config
  fda, summary = round_trip.fda_and_summary(task, model, params, cfg, ctx.source_prior)
  fda_params, fda_summary = fda_stage.train_fda(task, model, fda, params, cfg, ctx.val,
                                                ctx.workdir, ctx.metrics, summary)
  logging.info("FDA ready (%s)", fda_summary)
  ctx.extra["fda"] = {**fda_summary, "params": P.tree_size(fda_params)}
  methods = make_methods(ctx, fda, fda_params, summary)
  if "global_meta" in tuple(cfg.fda.get("bases", ())):
    methods.append(on_global_meta(ctx, fda, summary))
  return methods


def on_global_meta(ctx, fda, summary):
  """`cdc_mmpg_on_global_meta`: the FDA meta-trained (same recipe, same meta devices) to edit
  the data-matched control `global_meta` (the global model's dynamic leaves trained on those
  meta devices, the rate validation prefers) rather than the global model: what a user who
  has the meta data would deploy. The device holds global_meta's model (its dynamic leaves
  downloaded once) and runs cdc_mmpg's round trip on it."""
  task, model, cfg = ctx.task, ctx.model, ctx.config
  need("global_meta_selected" in ctx.shared, "fda.bases", tuple(cfg.fda.bases),
       "'global_meta' needs the global_meta family listed before cdc_mmpg in method_families")
  rate, base = ctx.shared["global_meta_selected"]
  fp, summ = fda_stage.train_fda(task, model, fda, base, cfg, ctx.val, ctx.workdir,
                                 ctx.metrics, summary, stage="fda_on_global_meta")
  logging.info("FDA on global_meta ready (%s)", summ)
  ctx.extra["fda_on_global_meta"] = {**summ, "global_meta_lr": rate}
  sub = dataclasses.replace(ctx, params=base, cost_model=costs.CostModel(task, model, base))
  plain = make_methods(sub, fda, fp, summary, variants=(("cdc_mmpg", cfg.adr.selector,
                                                          cfg.adr.k),))[0]

  def adapt(params, dev, hp):
    del params                   # the device's model is global_meta's, not the global one
    return plain.adapt(base, dev, hp)

  return dataclasses.replace(
      plain, name="cdc_mmpg_on_global_meta", adapt=adapt, diagnostics={},
      per_device_diagnostics=(), info=dict(plain.info, base=f"global_meta (lr {rate})"),
      seen=Seen(meta_devices=int(cfg.fda.meta_devices), shifts="training",
                note="the FDA edits the data-matched control global_meta (trained on the same "
                     "meta devices), not the global model"))


def make_methods(ctx, fda, fda_params, summary=None, variants=None):
  """cdc_mmpg (selector cfg.adr.selector, K = cfg.adr.k) and the ablations in cfg.adr (other
  selectors, a K sweep: ablations of cdc_mmpg), for a given FDA and its parameters; `variants`
  ((name, selector, K), ...) builds those rows only."""
  task, model, params, cfg, cm = ctx.task, ctx.model, ctx.params, ctx.config, ctx.cost_model
  ac = cfg.adr
  anchor_dims = task.anchor_dims(model, params)
  n_el = task.num_elements(model, params, cfg.data.context_size)
  primary = next(iter(anchor_dims))
  if variants is None:
    variants = [("cdc_mmpg", ac.selector, ac.k)]
    variants += [(f"cdc_mmpg_{'all_frames' if s == 'all' else s}", s, ac.k)
                 for s in ac.ablations]
    variants += [(f"cdc_mmpg_k{k}", ac.selector, k) for k in ac.k_sweep if k != ac.k]
  reference = reference_lib.shared(ctx, fda, fda_params, summary)
  cost_of = round_trip.cost_fns(task, model, params, cfg, cm, fda, fda_params, summary)
  methods = []
  for name, selector, k in variants:   # K ranges: validate_config
    kk = {m: (n if selector == "all" else k) for m, n in n_el.items()}

    def adapt(params, dev, hp, selector=selector, k=k):
      return round_trip.adapt_device(task, params, fda, fda_params, dev, selector=selector,
                                     k=k, clip=cfg.fda.clip,
                                     key=round_trip.device_key(cfg.seed, dev), summary=summary)

    cost = cost_of(selector, k)

    diags = {"anchor_mmd2" + ("" if m == primary else f"_{m}"): functools.partial(
        round_trip.anchor_mmd, task=task, selector=selector, k=k, seed=cfg.seed, modality=m)
             for m in anchor_dims}
    info = {"selector": selector, "k": kk[primary]}
    info.update(task.anchor_info(cfg))
    info.update({f"k_{m}": kk[m] for m in kk if m != primary})
    if name == "cdc_mmpg":
      info["reference_devices"] = int(reference["codes"].shape[0])
      diags["diagnosis"] = diagnostics(task, params, fda, fda_params, cfg, summary, reference)
    varies = ("" if name == "cdc_mmpg" else f"K = {k}" if selector == ac.selector
              else f"anchor selector {selector}")
    methods.append(Method(name, ({},), adapt, cost, uses=(task.context_role,),
                          diagnostics=diags, info=info,
                          per_device_diagnostics=DIAGNOSIS if name == "cdc_mmpg" else (),
                          role="ablation" if varies else "ours",
                          ablation_of="cdc_mmpg" if varies else "", varies=varies,
                          seen=Seen(meta_devices=int(cfg.fda.meta_devices), shifts="training")))
  return methods


def report_lines(results, task, workdir) -> list:
  """cdc_mmpg's own sections of report.md: the anchors (selector, K) and the diagnosis."""
  return cdc_report.report_lines(results, task, workdir)
