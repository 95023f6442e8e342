"""Stage 2: episodic meta-training of the FDA in the cloud (DESIGN §3.1), for any task.

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
kept. The stage loop (`train.run_stage`) resumes, checkpoints and guards as in stage 1.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmpg_jax import params as P
from mmpg_jax import preemption, train
from mmpg_jax.adapt import adr, cdc_mmpg
from mmpg_jax.adapt import fda as fda_lib

STAGE = "fda"


def encode_devices(task, model, params, ids, query_size: int, extra=None, *,
                   what: str = "meta devices", chunk_devices: int = 64) -> dict:
  """Renders and encodes the meta-distribution devices `ids` (`task.meta_devices`,
  `task.encode_meta`) in fixed-size chunks (one compile), honouring SIGTERM after each chunk and
  logging progress with its rate and ETA. `extra(params, encoded) -> dict` adds per-device
  arrays computed once here (vmapped over the chunk by the caller's function)."""

  @jax.jit
  def enc(p, raw):
    out = task.encode_meta(model, p, raw)
    if extra is not None:
      out.update(extra(p, out))
    return out

  ids = [int(i) for i in ids]
  n = len(ids)
  chunk_devices = max(1, min(chunk_devices, n))   # a small set is not padded to a full chunk
  parts = []
  t0, last_log = time.time(), time.time()
  for s in range(0, n, chunk_devices):
    part = ids[s:s + chunk_devices]
    part += [part[-1]] * (chunk_devices - len(part))            # fixed shapes: one compile
    f = jax.tree.map(np.asarray, enc(params, task.meta_devices(part, query_size)))
    parts.append(jax.tree.map(lambda v: v[:min(chunk_devices, n - s)], f))
    done = min(n, s + chunk_devices)
    if preemption.requested():        # minutes of encoding: stop now, nothing to save yet
      raise preemption.Preempted(f"preempted (SIGTERM) while encoding {what} ({done}/{n}); "
                                 f"they are recomputed on rerun, which resumes from the last "
                                 f"checkpoint")
    if time.time() - last_log > 10 or done == n:
      rate = done / max(time.time() - t0, 1e-9)
      logging.info("encoded %d/%d %s | %.1f devices/s, ETA %.0fs", done, n, what, rate,
                   (n - done) / max(rate, 1e-9))
      last_log = time.time()
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def encode_meta_pool(task, model, params, fc, summary=None, chunk_devices: int = 64,
                     what: str = "fda meta devices", first_id: int = 0) -> dict:
  """Encodes `fc.meta_devices` fresh meta devices (ids first_id..first_id+meta_devices-1; a
  stage that must not see another's devices starts past them).

  What depends only on the frozen device model is computed here once per device, not in
  every step: the herding order of each modality's context elements (greedy herding is
  prefix-consistent, so the first k of a K_max selection are the k-anchor selection) and the
  device's summary."""
  k_max = max(max(fc.train_ks), 1)
  consts = task.device_constants(model, params)

  def extra(p, out):
    ctx = out["context"]
    elements = jax.vmap(task.anchor_elements)(ctx)
    more = {"herd_idx": {m: jax.vmap(lambda e: adr.herding(e, k_max)[0])(el)
                         for m, el in elements.items()}}
    if summary is not None:
      more["summary"] = jax.vmap(lambda c: summary(p, {task.context_role: c, **consts}))(ctx)
    return more

  return encode_devices(task, model, params, range(first_id, first_id + fc.meta_devices),
                        fc.meta_query_size, extra, what=what, chunk_devices=chunk_devices)


def episode_upload(task, dev, k):
  """The anchors of one meta episode: per modality the first k of the device's herding order
  (k = 0: every element), weighted by Voronoi mass."""
  anchors, weights = {}, {}
  elements = task.anchor_elements(dev[task.context_role])
  for mod in task.anchor_modalities:
    el = elements[mod]
    n_el = el.shape[0]
    idx = dev["herd_idx"][mod]
    w = adr.voronoi_mass(el, idx, jnp.arange(idx.shape[0]) < k)
    anchors[mod] = el
    weights[mod] = jnp.where(k == 0, jnp.full(n_el, 1.0 / n_el), jnp.zeros(n_el).at[idx].add(w))
  upload = {"anchors": anchors, "weights": weights}
  if "summary" in dev:
    upload["summary"] = dev["summary"]
  return upload


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


def pool_batch(pool, n_per_step: int, seed: int, step: int, salt: int = 7) -> dict:
  """The `n_per_step` pool devices of a step: a per-epoch permutation (every device once before
  any repeats), a function of (seed, salt, step) only; `salt` gives a stage its own order."""
  n = len(jax.tree.leaves(pool)[0])
  per_epoch = max(n // n_per_step, 1)
  epoch, pos = divmod(step, per_epoch)
  ids = np.random.default_rng([seed, salt, epoch]).permutation(n)[
      pos * n_per_step:(pos + 1) * n_per_step]
  return jax.tree.map(lambda v: v[ids], pool)


def episode_batch(pool, fc, seed, step):
  """Devices and anchor budgets of a step: a function of (seed, step) only."""
  b = fc.devices_per_step
  ks = np.random.default_rng([seed, 11, step]).choice(np.asarray(fc.train_ks), b)
  return {"dev": pool_batch(pool, b, seed, step), "k": ks.astype(np.int32)}


def validator(task, model, val_feats, params_of):
  """`params_of(net, dev) -> device params` -> `validate(net)`: the mean selection metric on
  validation devices, signed so that higher is better (one jitted vmap over the devices)."""
  metric = task.selection_metric
  sign = 1.0 if metric.higher_is_better else -1.0

  def one(net, dev):
    query = dev[task.query_role]
    return task.metric_values(task.scores(model, params_of(net, dev), query), query)[metric.name]

  # The validation data is an argument, not a closed-over constant: XLA would otherwise
  # constant-fold the anchor selection of every device at compile time.
  batched = jax.jit(lambda net, sub: sign * jax.vmap(one, in_axes=(None, 0))(net, sub).mean())
  sub = {k: v for k, v in val_feats.items() if k not in (task.support_role, task.oracle_role)}
  return lambda net: batched(net, sub)


def make_validator(task, model, fda, base_params, val_feats, cfg, summary=None):
  """Mean selection metric of cdc_mmpg (default selector and K) on validation devices,
  signed so that higher is better."""
  ac = cfg.adr
  return validator(task, model, val_feats, lambda fda_params, dev: cdc_mmpg.adapt_device(
      task, base_params, fda, fda_params, dev, selector=ac.selector, k=ac.k, clip=cfg.fda.clip,
      key=cdc_mmpg.device_key(cfg.seed, dev), summary=summary))


def selected_state(params0, sc, key: str = "fda_params", what: str = "fda"):
  """(optimiser, the state before step 1) of a validation-selected meta-training stage: the
  trained parameters under `key`, their optimiser state, and the best-scoring parameters so
  far (also the restore target of the stage's checkpoints)."""
  tx = train.make_optimizer(sc, what)
  return tx, {key: params0, "opt_state": tx.init(params0), "step": jnp.int32(0),
              "best_params": params0, "best_score": jnp.float32(-np.inf),
              "best_step": jnp.int32(0)}


def initial_state(fda, cfg):
  """(optimiser, the FDA stage's state before step 1): also its checkpoints' restore target."""
  return selected_state(fda_lib.init(fda, jax.random.key(cfg.seed + 1)), cfg.fda)


def train_selected(stage, params0, sc, *, loss_fn, validate, make_batches, cfg, workdir,
                   metrics, key: str = "fda_params", metric: str = "accuracy",
                   config_key: str = "fda", hint: str = "Lower the stage's learning_rate."):
  """The meta-training loop every cloud hypernetwork shares (the FDA, DUET's generator,
  Persona's editors): AdamW over `loss_fn(params, batch) -> (loss, metrics)` on the stage
  config `sc` (learning_rate, warmup_steps, num_steps, weight_decay, grad_clip, eval_every,
  log_every, checkpoint_every), `validate(params)` (higher is better; validation devices only)
  at step 0 and every `sc.eval_every` steps, the best parameters kept. `make_batches()` ->
  `batch_fn(step)` runs only when there is work left (it may encode a pool of meta devices).
  Resumes, checkpoints and guards as every stage (train.run_stage). Returns (best params,
  summary). `config_key` names the stage config in errors."""
  tx, state = selected_state(params0, sc, key, config_key)

  def prepare(state, start):
    if start == 0:
      s0 = float(validate(state[key]))
      state = dict(state, best_score=jnp.float32(s0))
      metrics.write(stage, 0, **{f"val_{metric}": s0})
      logging.info("%s step 0 (initial parameters) val %s %.4f", stage, metric, s0)
    batch_fn = make_batches()
    return state, train.make_train_step(loss_fn, tx, key=key), batch_fn

  def after_step(state, done):
    if done % sc.eval_every and done != sc.num_steps:
      return state, {}
    score = float(validate(state[key]))
    if score > float(state["best_score"]):
      state = dict(state, best_params=state[key], best_score=jnp.float32(score),
                   best_step=jnp.int32(done))
    return state, {f"val_{metric}": score}

  state = train.run_stage(stage, state, sc, workdir=workdir, metrics=metrics,
                          key=jax.random.key(cfg.seed + 2), prepare=prepare,
                          after_step=after_step, keep=cfg.train.keep_checkpoints, hint=hint)
  return state["best_params"], {"best_step": int(state["best_step"]),
                                f"best_val_{metric}": float(state["best_score"]),
                                "steps": int(state["step"])}


def train_fda(task, model, fda, base_params, cfg, val_feats, workdir, metrics, summary=None,
              stage: str = STAGE):
  """Meta-trains (or resumes, or reloads) the FDA; returns the validation-selected params.
  `task` supplies the meta devices (a `task.with_data(...)` task meta-trains over other data);
  `stage` names the checkpoints and metrics rows (one per FDA a run trains)."""
  fc = cfg.fda

  def make_batches():
    t = time.time()
    pool = encode_meta_pool(task, model, base_params, fc, summary=summary)
    logging.info("%s: encoded %d fresh meta devices in %.1fs", stage, fc.meta_devices,
                 time.time() - t)
    return lambda step: episode_batch(pool, fc, cfg.seed, step)

  return train_selected(
      stage, fda_lib.init(fda, jax.random.key(cfg.seed + 1)), fc,
      loss_fn=meta_loss_fn(task, model, fda, base_params, fc),
      validate=make_validator(task, model, fda, base_params, val_feats, cfg, summary),
      make_batches=make_batches, cfg=cfg, workdir=workdir, metrics=metrics,
      metric=task.selection_metric.name, hint="Lower fda.learning_rate.")
