"""Baselines under one protocol: global, fta_k{1,5,10}, tent, prior_em, qb_norm, dsl, oracle.

A method that does not apply to a task (prior_em without label groups) is not built for it.
"""
import dataclasses

import jax
import jax.numpy as jnp

from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import need
from mmpg_jax.ondevice import costs, device
from mmpg_jax.tasks.capabilities import GalleryRanking, LabelGroups, ScoredContext
from mmpg_jax.training.methods import Method, Seen, grid


def global_method():
  return Method("global", ({},), lambda params, dev, hp: params,
                lambda hp: costs.DeviceCost(), uses=())


def finetune_method(ctx, name, role, n, leaves, objective, optimizer, method_grid, *,
                    labelled, first=None):
  """On-device gradient steps on `role` (its first `first` samples if given): FTA, TENT and
  the oracle differ only in these arguments. Costs: n samples x steps backward passes."""
  loss_fn = device.objective(ctx.task, ctx.model, objective)
  cm = ctx.cost_model

  def adapt(params, dev, hp):
    feats = dev[role] if first is None else jax.tree.map(lambda x: x[:first], dev[role])
    return device.finetune(loss_fn, params, leaves, feats, optimizer=optimizer, lr=hp["lr"],
                           steps=hp["steps"])

  def cost(hp):
    return costs.DeviceCost(
        device_backward_passes=n * hp["steps"], labels_used_per_device=n if labelled else 0,
        device_flops=cm.encode(n) + hp["steps"] * cm.step(n, leaves, objective, optimizer))

  return Method(name, method_grid, adapt, cost, uses=(role,))


def fta(ctx, k: int):
  """Fine-tuning on the device with the first k labelled support samples (backprop)."""
  fc, d = ctx.config.baselines.fta, ctx.config.data
  if k > d.support_size:
    raise ValueError(f"fta k={k} needs k <= data.support_size={d.support_size}")
  return finetune_method(ctx, f"fta_k{k}", ctx.task.support_role, k, fc.leaves, "supervised",
                         "sgd", grid(lr=fc.learning_rates, steps=fc.steps), labelled=True,
                         first=k)


def tent(ctx):
  """Test-time entropy minimisation on the unlabelled context (the task's entropy). TENT
  adapts BatchNorm's affines and re-estimates its statistics; these device models have no
  BatchNorm, so the row adapts the LayerNorm affines of `baselines.tent.leaves` (the
  statistics part does not exist here), and says so in the report."""
  tc = ctx.config.baselines.tent
  m = finetune_method(ctx, "tent", ctx.task.context_role, ctx.config.data.context_size,
                      tc.leaves, "entropy", "adam", grid(lr=tc.learning_rates, steps=tc.steps),
                      labelled=False)
  return dataclasses.replace(m, seen=Seen(
      note="adapts LayerNorm affines (" + ", ".join(tc.leaves) + "): the models have no "
           "BatchNorm, whose test-batch statistics are TENT's main mechanism"))


def oracle(ctx):
  """Upper bound, not a method: fine-tuning on plenty of the device's own labelled data."""
  oc = ctx.config.baselines.oracle
  return finetune_method(ctx, "oracle", ctx.task.oracle_role, ctx.config.data.oracle_size,
                         oc.leaves, "supervised", "adam",
                         grid(lr=oc.learning_rates, steps=oc.steps), labelled=True)


def prior_em(ctx, question_types="all"):
  """EM label-shift correction (Saerens et al. 2002) on the unlabelled context, applied as a
  logit bias: an edit of the task's `label_bias_leaf`. Forward passes only, no labels.

  "all" (method `prior_em`): the device evaluates every label group on each context sample
  (one forward pass per group) and re-estimates each group's prior from all samples. "asked"
  (`prior_em_asked`): only what was asked of each sample, one EM over the whole label
  vocabulary, so each group's prior sees only the samples it was asked of."""
  task, model, cm = ctx.task, ctx.model, ctx.cost_model
  ec = ctx.config.baselines.prior_em
  n = ctx.config.data.context_size
  source_prior = jnp.asarray(ctx.source_prior)
  bias_leaf = task.label_bias_leaf
  P.select(ctx.params, [bias_leaf])   # fail early if the model has no such leaf

  def adapt(params, dev, hp):
    if question_types == "all":
      return device.label_shift_correction(task, model, params, dev, source_prior,
                                           iterations=ec.iterations,
                                           smoothing=hp["smoothing"], scale=hp["scale"])
    probs = task.asked_posteriors(model, params, dev)
    prior = device.em_prior(probs, source_prior, ec.iterations, hp["smoothing"])
    ratio = jnp.log(prior) - jnp.log(source_prior)
    return P.apply_edit(params, P.unflatten({bias_leaf: hp["scale"] * ratio}))

  def cost(hp):
    # "all": every group asked of every sample; "asked": one forward pass per sample
    shift = (cm.label_shift(n, ec.iterations) if question_types == "all"
             else cm.forward(n) + cm.em(n, ec.iterations))
    return costs.DeviceCost(
        downlink_bytes=float(source_prior.size * source_prior.dtype.itemsize),  # source prior
        device_flops=cm.encode(n) + shift)

  name = "prior_em" if question_types == "all" else "prior_em_asked"
  return Method(name, grid(smoothing=ec.smoothing, scale=ec.scales), adapt, cost,
                uses=(task.context_role,))


def dynamic_inverted_softmax(scores, bank, beta):
  """QB-Norm's dynamic inverted softmax (Bogolin et al. 2022): scores [n_q, n_g] of the
  device's queries, bank [n_b, n_g] of the query bank against the same gallery. The gallery
  items some bank query retrieves first form the activation set; a query whose own first
  item lies in it gets the inverted softmax, beta s(q, v) - logsumexp_b(beta s(b, v)) (the
  log of exp(beta s) / sum_b exp(beta s(b, v))), every other query keeps its scores. Each
  query's row ranks the gallery on its own, so the two kinds of row never compete."""
  active = jnp.zeros(bank.shape[1], bool).at[jnp.argmax(bank, axis=1)].set(True)
  normalised = beta * scores - jax.nn.logsumexp(beta * bank, axis=0)[None, :]
  use = active[jnp.argmax(scores, axis=1)]
  return jnp.where(use[:, None], normalised, scores)


def dual_softmax(scores, temperature):
  """Dual softmax (Cheng et al. 2021): each similarity times the prior of its query among the
  device's queries for that gallery item, s(q, v) * softmax_q(temperature * s(q, v))."""
  return scores * jax.nn.softmax(temperature * scores, axis=0)


def qb_norm(ctx):
  """Querybank normalisation with the dynamic inverted softmax over a bank of the cloud's own
  training queries (`baselines.qb_norm.bank_size` captions of global_train, encoded once in the
  cloud and downloaded once as text codes). Forward only, no labels, no upload; for tasks whose
  scores rank a gallery (`task.training_queries`, `task.gallery_scores`)."""
  task, model = ctx.task, ctx.model
  qc = ctx.config.baselines.qb_norm
  bank_text = jax.device_get(task.training_queries(model, ctx.params, int(qc.bank_size),
                                                   ctx.config.seed))

  def rescore(params, dev, hp, scores):
    bank = task.gallery_scores(model, params, bank_text, dev)     # [n_bank, n_gallery]
    return dynamic_inverted_softmax(scores, bank, hp["beta"])

  example = task.example_features(model, ctx.params, ctx.config.data.query_size)
  dbytes = costs.dtype_bytes(ctx.config.comm_dtype)

  def cost(hp):
    flops = costs.flops(lambda p, f: dynamic_inverted_softmax(
        task.scores(model, p, f), task.gallery_scores(model, p, bank_text,
                                                      {task.query_role: f}), 1.0),
        ctx.params, example) - costs.flops(lambda p, f: task.scores(model, p, f),
                                           ctx.params, example)
    return costs.DeviceCost(downlink_bytes=float(bank_text.size * dbytes), device_flops=flops)

  return Method("qb_norm", grid(beta=qc.inverse_temperatures), lambda params, dev, hp: params,
                cost, uses=(), rescore=rescore, role="rival",
                info={"bank_size": int(qc.bank_size)},
                seen=Seen(note="dynamic inverted softmax over a bank of the cloud's training "
                               "queries (downloaded once as text codes)"))


def dsl(ctx):
  """Dual softmax over the device's own queries (transductive over the batch it is asked to
  rank, as the paper evaluates it). Forward only, no labels, no upload."""
  task, model = ctx.task, ctx.model
  qc = ctx.config.baselines.qb_norm

  def rescore(params, dev, hp, scores):
    return dual_softmax(scores, hp["temperature"])

  example = task.example_features(model, ctx.params, ctx.config.data.query_size)
  scores0 = task.scores(model, ctx.params, example)

  def cost(hp):
    return costs.DeviceCost(device_flops=costs.flops(lambda s: dual_softmax(s, 1.0), scores0))

  return Method("dsl", grid(temperature=qc.dsl_temperatures), lambda params, dev, hp: params,
                cost, uses=(), rescore=rescore, role="rival",
                seen=Seen(note="dual softmax over the device's own queries"))


KNOWN = ("global", "fta", "tent", "prior_em", "qb_norm", "dsl", "oracle")


def validate_config(cfg, task, model, abstract_params) -> None:
  inc = tuple(cfg.baselines.include)
  need("global" in inc and set(inc) <= set(KNOWN), "baselines.include", inc,
       f"a subset of {KNOWN} that holds 'global' (every report is relative to it)")
  need("oracle" not in inc or task.oracle_role is not None, "baselines.include", inc,
       f"task {task.name!r} has no oracle data; leave 'oracle' out")
  need("tent" not in inc or isinstance(task, ScoredContext), "baselines.include", inc,
       f"task {task.name!r} has no unsupervised objective on its context for TENT (it is not "
       f"a capabilities.ScoredContext task); leave 'tent' out")


def build(ctx):
  bc = ctx.config.baselines
  inc = set(bc.include)
  methods = [global_method()]
  if "fta" in inc:
    methods += [fta(ctx, k) for k in bc.fta.ks]
  if "tent" in inc:
    methods += [tent(ctx)]
  if "prior_em" in inc and isinstance(ctx.task, LabelGroups):
    methods += [prior_em(ctx, q) for q in bc.prior_em.variants]
  ranks = isinstance(ctx.task, GalleryRanking)
  if "qb_norm" in inc and ranks and "qb_norm" in bc:
    methods += [qb_norm(ctx)]
  if "dsl" in inc and ranks and "qb_norm" in bc:
    methods += [dsl(ctx)]
  if "oracle" in inc:
    methods += [oracle(ctx)]
  return methods
