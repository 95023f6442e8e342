"""The FDA's meta-training stage (`fda`): episodic, in the cloud, for any task.

An episode is one simulated meta device, never seen by the global model (the task's meta
devices are disjoint from its cloud training data): its unlabelled context -> the task's anchor
elements -> ADR anchors (herding, K drawn per episode from `fda.train_ks`, 0 = all elements)
-> FDA edit -> the task's loss on that device's labelled query (`task.meta_loss`), plus, for
tasks with label groups, the FDA's auxiliary per-anchor label loss (the cloud knows the
simulated context's labels; a real device never sends them) and an edit-norm penalty. The
device model's base parameters stay frozen.

The meta devices are a pool of `fda.meta_devices` fresh devices encoded once by the (frozen)
static encoders; steps walk through the pool in a per-epoch permutation, so every device is
used once before any repeats. Model selection: the FDA is scored on validation devices every
`fda.eval_every` steps, and the best-scoring parameters (step 0, the zero edit, included) are
kept. The generic parts (encoding, pool batches, the validator, the selected-state loop) are
meta_train.py's; the stage loop (`train.run_stage`) resumes, checkpoints and guards as the
global model's training does.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmpg_jax.core import checkpointing
from mmpg_jax.core import params as P
from mmpg_jax.core.upload import Upload
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import per_leaf, round_trip
from mmpg_jax.ondevice import adr
from mmpg_jax.training import meta_train, runs

STAGE = "fda"


def encode_meta_pool(task, model, params, fc, summary=None, chunk_devices: int = 64,
                     what: str = "fda meta devices", first_id: int = 0,
                     selector: str = "herding", workdir: str | None = None) -> dict:
  """Encodes `fc.meta_devices` fresh meta devices (ids first_id..first_id+meta_devices-1; a
  stage that must not see another's devices starts past them).

  What depends only on the frozen device model is computed here once per device, not in
  every step: the herding order of each modality's context elements (greedy herding is
  prefix-consistent, so the first k of a K_max selection are the k-anchor selection) and the
  device's summary. The herding is the device's selector's (`adr.herding_kind`), so episodes
  see the anchors devices send; each K of `fc.train_ks` has its prefix's weights. With a
  `workdir` the encoded devices come from (or go to) the run's stored pools (meta_pool), shared
  with every stage that reads them; the herding tables and summaries are computed here."""
  k_max = max(max(fc.train_ks), 1)
  herd = adr.herding_kind(selector)
  ks = np.asarray(sorted(set(fc.train_ks)), np.int32)
  m0 = task.anchor_modalities[0]
  consts = task.device_constants(model, params)

  def extra(p, out):
    ctx = out["context"]
    elements = jax.vmap(task.anchor_elements)(ctx)
    idx = {m: jax.vmap(lambda e: adr.herding_order(e, k_max, herd))(el)
           for m, el in elements.items()}
    more = {"herd_idx": idx, "herd_ks": jnp.broadcast_to(ks, (len(idx[m0]), len(ks))),
            "herd_weights": {m: jax.vmap(lambda e, i: jnp.stack([
                adr.prefix_weights(e, i, k, herd) for k in ks]))(el, idx[m])
                for m, el in elements.items()}}
    if summary is not None:
      more["summary"] = jax.vmap(lambda c: summary(p, {task.context_role: c, **consts}))(ctx)
    return more

  return meta_train.encode_devices(task, model, params,
                                   range(first_id, first_id + fc.meta_devices),
                                   fc.meta_query_size, extra, what=what,
                                   chunk_devices=chunk_devices, workdir=workdir)


def episode_upload(task, dev, k):
  """The anchors of one meta episode: per modality the first k of the device's herding order
  (k = 0: every element), weighted by their Voronoi masses (encode_meta_pool's table)."""
  anchors, weights = {}, {}
  elements = task.anchor_elements(dev[task.context_role])
  for mod in task.anchor_modalities:
    el = elements[mod]
    n_el = el.shape[0]
    idx = dev["herd_idx"][mod]
    w = jnp.where((dev["herd_ks"] == k)[:, None], dev["herd_weights"][mod], 0.0).sum(0)
    anchors[mod] = el
    weights[mod] = jnp.where(k == 0, jnp.full(n_el, 1.0 / n_el), jnp.zeros(n_el).at[idx].add(w))
  return Upload(anchors, weights, dev.get("summary"))


def episode_losses(task, model, fda, base_params, fda_params, dev, k, *, clip):
  """One meta device: (task loss, aux loss, edit penalty, selection metric)."""
  edit, aux = fda.apply({"params": fda_params}, episode_upload(task, dev, k))
  params = P.apply_edit(base_params, edit, clip)
  task_loss, metric = task.meta_loss(model, params, dev[task.query_role])
  aux_loss = 0.0
  labels = task.element_labels(dev) if fda.label_groups else None
  if labels is not None:
    for g, (lo, hi) in enumerate(fda.label_groups):
      aux_loss += optax.softmax_cross_entropy_with_integer_labels(
          aux["aux_logits"][:, lo:hi], labels[:, g] - lo).mean()
  deltas = [P.materialize(d, d.a.shape[:1] + d.b.shape[1:]) if isinstance(d, P.LowRankDelta)
            else d for d in P.edit_leaves(edit).values()]
  penalty = sum(jnp.mean(d * d) for d in deltas)
  return task_loss, aux_loss, penalty, metric


def meta_loss_fn(task, model, fda, base_params, fc):
  """(fda_params, batch) -> (loss, metrics): the mean over a batch of episodes."""

  def loss_fn(fda_params, batch):
    task_loss, aux, pen, metric = jax.vmap(
        lambda d, k: episode_losses(task, model, fda, base_params, fda_params, d, k,
                                    clip=fc.clip))(batch["dev"], batch["k"])
    loss = task_loss.mean() + fc.aux_weight * aux.mean() + fc.edit_penalty * pen.mean()
    return loss, {"task_loss": task_loss.mean(), "aux_loss": aux.mean(),
                  "edit_penalty": pen.mean(),
                  f"query_{task.selection_metric.name}": metric.mean()}

  return loss_fn


def episode_batch(pool, fc, seed, step):
  """Devices and anchor budgets of a step: a function of (seed, step) only."""
  b = fc.devices_per_step
  ks = np.random.default_rng([seed, 11, step]).choice(np.asarray(fc.train_ks), b)
  return {"dev": meta_train.pool_batch(pool, b, seed, step), "k": ks.astype(np.int32)}


def make_validator(task, model, fda, base_params, val_feats, cfg, summary=None):
  """Mean selection metric of cdc_mmpg (default selector and K) on validation devices,
  signed so that higher is better."""
  ac = cfg.adr
  return meta_train.validator(task, model, val_feats, lambda fda_params, dev: (
      round_trip.adapt_device(task, base_params, fda, fda_params, dev, selector=ac.selector,
                              k=ac.k, clip=cfg.fda.clip,
                              key=round_trip.device_key(cfg.seed, dev), summary=summary)))


def initial_state(fda, cfg):
  """(optimiser, the FDA stage's state before step 1): also its checkpoints' restore target."""
  return meta_train.selected_state(fda_lib.init(fda, jax.random.key(cfg.seed + 1)), cfg.fda)


def train_fda(task, model, fda, base_params, cfg, val_feats, workdir, metrics, summary=None,
              stage: str = STAGE):
  """Meta-trains (or resumes, or reloads) the FDA; returns the validation-selected params.
  `task` supplies the meta devices (a `task.with_data(...)` task meta-trains over other data);
  `stage` names the checkpoints and metrics rows (one per FDA a run trains)."""
  fc = cfg.fda

  def make_batches():
    t = time.time()
    pool = encode_meta_pool(task, model, base_params, fc, summary=summary,
                            selector=cfg.adr.selector, workdir=workdir)
    logging.info("%s: %d meta devices and their anchor tables ready in %.1fs", stage,
                 fc.meta_devices, time.time() - t)
    return lambda step: episode_batch(pool, fc, cfg.seed, step)

  return meta_train.train_selected(
      stage, fda_lib.init(fda, jax.random.key(cfg.seed + 1)), fc,
      loss_fn=meta_loss_fn(task, model, fda, base_params, fc),
      validate=make_validator(task, model, fda, base_params, val_feats, cfg, summary),
      make_batches=make_batches, cfg=cfg, workdir=workdir, metrics=metrics,
      metric=task.selection_metric.name, hint="Lower fda.learning_rate.")


def load_finished(fda, cfg, workdir, stage: str = STAGE):
  """The validation-selected parameters of a finished FDA stage (StageNotFinishedError if it
  has not finished): what a reader of a run (a family built on the plain FDA, `generate`)
  takes without training anything. A run written in the per-leaf layout loads converted."""
  _, target = initial_state(fda, cfg)
  try:
    return checkpointing.restore_finished(workdir, stage, target,
                                          cfg.fda.num_steps)["best_params"]
  except checkpointing.CheckpointMismatchError as stacked_error:
    # A run from before the stacked layout: its FDA in the per-leaf layout, converted.
    per_leaf_params = per_leaf.module(fda).init(jax.random.key(0),
                                                fda_lib.example_upload(fda))["params"]
    _, old = meta_train.selected_state(per_leaf_params, cfg.fda)
    try:
      state = checkpointing.restore_finished(workdir, stage, old, cfg.fda.num_steps)
    except checkpointing.CheckpointMismatchError:
      raise stacked_error from None
    logging.info("%s: the checkpoint holds the FDA's per-leaf layout; converted to the stacked "
                 "layout (per_leaf.stack)", stage)
    return per_leaf.stack(fda, state["best_params"])


def restore(config, workdir: str):
  """(task, model, base params, fda, fda params, summary fn) of a finished run whose FDA stage
  has finished: what `generate` and `bench` read. The run's own checks (config, global stage)
  are `runs.restore_base`'s."""
  if "fda" not in config:
    raise runs.RunNotFinishedError(
        f"this config has no fda block (method_families={tuple(config.method_families)}), so "
        f"its runs train no FDA to generate edits with.")
  task, model, params = runs.restore_base(config, workdir)
  prior = task.source_prior(task.prepare_data())
  fda, summary = round_trip.fda_and_summary(task, model, params, config, prior)
  return task, model, params, fda, load_finished(fda, config, os.path.abspath(workdir)), summary
