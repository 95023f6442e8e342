"""Baselines under one protocol: global, fta_k{1,5,10}, tent, prior_em, oracle.

A `Method` has a grid of hyper-parameter settings (selected on validation devices only), a
pure per-device `adapt(params, device, hp) -> params` run on encoded features (vmapped over
devices by the evaluator), and `cost(hp)`: what one device pays for it.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mmpg_jax import costs
from mmpg_jax import params as P
from mmpg_jax.adapt import device
from mmpg_jax.data import moving_digits as md


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  grid: tuple                       # of dicts; more than one = chosen on validation devices
  adapt: Callable                   # (params, device_feats, hp) -> params, pure
  cost: Callable                    # hp -> costs.DeviceCost
  uses: tuple = ()                  # roles of the device data the method reads
  diagnostics: dict = dataclasses.field(default_factory=dict)   # name -> f(device) -> scalar
  info: dict = dataclasses.field(default_factory=dict)          # copied into results.json


def _grid(**axes):
  keys = list(axes)
  out = [{}]
  for k in keys:
    out = [dict(g, **{k: v}) for g in out for v in axes[k]]
  return tuple(out)


def global_method():
  return Method("global", ({},), lambda params, dev, hp: params,
                lambda hp: costs.DeviceCost(), uses=())


def fta(model, cm, cfg, k: int):
  """Fine-tuning on the device with the first k labelled support samples (backprop)."""
  fc = cfg.baselines.fta
  if k > cfg.data.support_size:
    raise ValueError(f"fta k={k} needs k <= data.support_size={cfg.data.support_size}")

  def adapt(params, dev, hp):
    feats = jax.tree.map(lambda x: x[:k], dev["support"])
    return device.finetune(model, params, fc.leaves, feats, objective="cross_entropy",
                           optimizer="sgd", lr=hp["lr"], steps=hp["steps"])

  def cost(hp):
    return costs.DeviceCost(
        device_backward_passes=k * hp["steps"], labels_used_per_device=k,
        device_flops=cm.encode(k) + hp["steps"] * cm.step(k, fc.leaves, "cross_entropy", "sgd"))

  return Method(f"fta_k{k}", _grid(lr=fc.learning_rates, steps=fc.steps), adapt, cost,
                uses=("support",))


def tent(model, cm, cfg):
  """Test-time entropy minimisation on the unlabelled context (normalisation affine)."""
  tc = cfg.baselines.tent
  n = cfg.data.context_size

  def adapt(params, dev, hp):
    return device.finetune(model, params, tc.leaves, dev["context"], objective="entropy",
                           optimizer="adam", lr=hp["lr"], steps=hp["steps"])

  def cost(hp):
    return costs.DeviceCost(
        device_backward_passes=n * hp["steps"],
        device_flops=cm.encode(n) + hp["steps"] * cm.step(n, tc.leaves, "entropy", "adam"))

  return Method("tent", _grid(lr=tc.learning_rates, steps=tc.steps), adapt, cost,
                uses=("context",))


def prior_em(model, cm, cfg, source_prior, question_types="all",
             bias_leaf="answer_head/out/bias"):
  """EM label-shift correction (Saerens et al. 2002) on the unlabelled context, applied as a
  logit bias: an edit of the answer head's bias. Forward passes only, no labels.

  question_types="all" (method `prior_em`): the device asks every question type of each
  context video (one forward pass per type) and re-estimates each type's answer prior from
  all its videos. "asked" (`prior_em_asked`): only the question the user asked, one EM over
  the shared answer vocabulary, so each type's prior sees only the videos it was asked of."""
  ec = cfg.baselines.prior_em
  n = cfg.data.context_size
  source_prior = jnp.asarray(source_prior)
  P.select(cm.params, [bias_leaf])   # fail early if the model has no such leaf
  nq = len(md.QUESTION_TYPES)

  def adapt(params, dev, hp):
    if question_types == "all":
      ratio = device.label_shift_ratio(model, params, dev["context"]["frames"], dev["type_q"],
                                       source_prior, md.ANSWER_GROUPS,
                                       iterations=ec.iterations, smoothing=hp["smoothing"])
    else:
      probs = jax.nn.softmax(device.logits(model, params, dev["context"]))
      prior = device.em_prior(probs, source_prior, ec.iterations, hp["smoothing"])
      ratio = jnp.log(prior) - jnp.log(source_prior)
    return P.apply_edit(params, P.unflatten({bias_leaf: hp["scale"] * ratio}))

  def cost(hp):
    passes = nq if question_types == "all" else 1
    return costs.DeviceCost(
        downlink_bytes=float(source_prior.size * source_prior.dtype.itemsize),  # source prior
        device_flops=cm.encode(n) + cm.forward(n * passes) + cm.em(n, ec.iterations))

  name = "prior_em" if question_types == "all" else "prior_em_asked"
  return Method(name, _grid(smoothing=ec.smoothing, scale=ec.scales), adapt, cost,
                uses=("context",))


def oracle(model, cm, cfg):
  """Upper bound, not a method: fine-tuning on plenty of the device's own labelled data."""
  oc = cfg.baselines.oracle
  n = cfg.data.oracle_size

  def adapt(params, dev, hp):
    return device.finetune(model, params, oc.leaves, dev["oracle"], objective="cross_entropy",
                           optimizer="adam", lr=hp["lr"], steps=hp["steps"])

  def cost(hp):
    return costs.DeviceCost(
        device_backward_passes=n * hp["steps"], labels_used_per_device=n,
        device_flops=cm.encode(n) + hp["steps"] * cm.step(n, oc.leaves, "cross_entropy",
                                                           "adam"))

  return Method("oracle", _grid(lr=oc.learning_rates, steps=oc.steps), adapt, cost,
                uses=("oracle",))


def build(model, cm, cfg, source_prior):
  methods = [global_method()]
  methods += [fta(model, cm, cfg, k) for k in cfg.baselines.fta.ks]
  methods += [tent(model, cm, cfg)]
  methods += [prior_em(model, cm, cfg, source_prior, q) for q in cfg.baselines.prior_em.variants]
  methods += [oracle(model, cm, cfg)]
  return methods
