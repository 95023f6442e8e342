"""Stage 2: episodic meta-training of the FDA in the cloud (DESIGN §3.1).

An episode is one simulated meta device, never seen by the global model (disjoint devices and
digit instances): its unlabelled context -> ADR anchors (herding, K drawn per episode from
`fda.train_ks`, 0 = all frame elements) -> FDA edit -> task loss on that device's labelled
query videos (every question type), plus the FDA's auxiliary per-anchor answer loss (the cloud
knows the simulated context's labels; a real device never sends them) and an edit-norm penalty.
The device model's base parameters stay frozen.

The meta devices are a pool of `fda.meta_devices` fresh devices encoded once by the (frozen)
static encoders; steps walk through the pool in a per-epoch permutation, so every device is
used once before any repeats. Model selection: the FDA is scored on validation devices every
`fda.eval_every` steps, and the best-scoring parameters (step 0, the zero edit, included) are
kept. Checkpoints and resume as in stage 1; the step fixes the data order and the RNG.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmpg_jax import checkpointing, preemption
from mmpg_jax import params as P
from mmpg_jax.adapt import adr, cdc_mmpg, device
from mmpg_jax.adapt import fda as fda_lib
from mmpg_jax.data import pipeline
from mmpg_jax.train import NonFiniteError

STAGE = "fda"


def encode_meta_pool(model, params, data_cfg, fc, chunk_devices: int = 64, summary=None,
                     type_q=None) -> dict:
  """Encodes `fc.meta_devices` fresh meta devices: context frames (+ their labels, cloud-only)
  and query frames, question codes and answers for every question type.

  What depends only on the frozen device model is computed here once per device, not in
  every step: the herding order of the context's frame elements (greedy herding is
  prefix-consistent, so the first k of a K_max selection are the k-anchor selection) and the
  device's EM summary."""
  k_max = max(max(fc.train_ks), 1)
  roles = {"context": data_cfg.context_size, "query": fc.meta_query_size}
  sampler = pipeline.MetaDeviceSampler(data_cfg, roles=roles, labelled=True)

  @jax.jit
  def enc(p, ctx_video, q_video, q_questions):
    ctx = model.apply({"params": p}, ctx_video, method=model.encode_frames)
    out = {"ctx_frames": ctx,
           "q_frames": model.apply({"params": p}, q_video, method=model.encode_frames),
           "q_codes": model.apply({"params": p}, q_questions, method=model.encode_question),
           "herd_idx": jax.vmap(lambda f: adr.herding(adr.frame_elements(f), k_max)[0])(ctx)}
    if summary is not None:
      out["device_ratio"] = jax.vmap(lambda f: summary(p, f, type_q))(ctx)
    return out

  parts = []
  n = fc.meta_devices
  for s in range(0, n, chunk_devices):
    ids = list(range(s, min(n, s + chunk_devices)))
    ids += [ids[-1]] * (chunk_devices - len(ids))             # fixed shapes: one compile
    devs = [sampler.device(i) for i in ids]
    stack = lambda role, key: np.stack([d[role][key] for d in devs])
    f = enc(params, stack("context", "video"), stack("query", "video"),
            stack("query", "questions"))
    f = {k: np.asarray(v) for k, v in f.items()}
    f["ctx_answers"] = stack("context", "answers")
    f["q_answers"] = stack("query", "answers")
    parts.append({k: v[:min(chunk_devices, n - s)] for k, v in f.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def episode_losses(model, fda, base_params, fda_params, dev, k, *, clip, groups):
  """One meta device: (task loss, aux loss, edit penalty, accuracy). The anchors are the
  first k of the device's herding order (k = 0: every element), weighted by Voronoi mass."""
  el = adr.frame_elements(dev["ctx_frames"])
  n_el = el.shape[0]
  idx = dev["herd_idx"]
  w = adr.voronoi_mass(el, idx, jnp.arange(idx.shape[0]) < k)
  weights = jnp.where(k == 0, jnp.full(n_el, 1.0 / n_el), jnp.zeros(n_el).at[idx].add(w))
  edit, aux = fda.apply({"params": fda_params}, el, weights, dev.get("device_ratio"))
  params = P.apply_edit(base_params, edit, clip)
  nq = dev["q_codes"].shape[1]
  frames = jnp.broadcast_to(dev["q_frames"][:, None], (dev["q_frames"].shape[0], nq)
                            + dev["q_frames"].shape[1:])
  logits = device.logits(model, params, {"frames": frames, "q": dev["q_codes"]})
  task = optax.softmax_cross_entropy_with_integer_labels(logits, dev["q_answers"]).mean()
  acc = (logits.argmax(-1) == dev["q_answers"]).mean()
  t_el = dev["ctx_frames"].shape[1] - 1
  labels = jnp.repeat(dev["ctx_answers"], t_el, axis=0)        # element order: video-major
  aux_loss = 0.0
  for g, (lo, hi) in enumerate(groups):
    aux_loss += optax.softmax_cross_entropy_with_integer_labels(
        aux["aux_logits"][:, lo:hi], labels[:, g] - lo).mean()
  deltas = [P.materialize(d, d.a.shape[:1] + d.b.shape[1:]) if isinstance(d, P.LowRankDelta)
            else d for d in P.edit_leaves(edit).values()]
  penalty = sum(jnp.mean(d * d) for d in deltas)
  return task, aux_loss, penalty, acc


def make_meta_step(model, fda, base_params, fc, groups, tx):

  def loss_fn(fda_params, batch):
    task, aux, pen, acc = jax.vmap(
        lambda d, k: episode_losses(model, fda, base_params, fda_params, d, k, clip=fc.clip,
                                    groups=groups))(batch["dev"], batch["k"])
    loss = task.mean() + fc.aux_weight * aux.mean() + fc.edit_penalty * pen.mean()
    return loss, {"task_loss": task.mean(), "aux_loss": aux.mean(), "edit_penalty": pen.mean(),
                  "query_accuracy": acc.mean()}

  def meta_step(state, batch, rng):
    del rng  # the episode's randomness (devices, K) is fixed by the step in `episode_batch`
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["fda_params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["fda_params"])
    new = dict(state, fda_params=optax.apply_updates(state["fda_params"], updates),
               opt_state=opt_state, step=state["step"] + 1)
    return new, dict(m, loss=loss, grad_norm=optax.tree.norm(grads))

  return jax.jit(meta_step)


def episode_batch(pool, fc, seed, step):
  """Devices and anchor budgets of a step: a function of (seed, step) only."""
  n = len(pool["ctx_frames"])
  b = fc.devices_per_step
  per_epoch = max(n // b, 1)
  epoch, pos = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, 7, epoch]).permutation(n)
  ids = perm[pos * b:(pos + 1) * b]
  ks = np.random.default_rng([seed, 11, step]).choice(np.asarray(fc.train_ks), b)
  return {"dev": {k: v[ids] for k, v in pool.items()}, "k": ks.astype(np.int32)}


def make_validator(model, fda, base_params, val_feats, cfg, summary=None):
  """Mean query accuracy of cdc_mmpg (default selector and K) on validation devices."""
  ac = cfg.adr

  def one(fda_params, dev):
    p = cdc_mmpg.adapt_device(base_params, fda, fda_params, dev["context"]["frames"],
                              selector=ac.selector, k=ac.k, clip=cfg.fda.clip,
                              key=cdc_mmpg.device_key(cfg.seed, dev),
                              summary=summary, type_q=dev["type_q"])
    return device.accuracy(model, p, dev["query"])

  # The validation data is an argument, not a closed-over constant: XLA would otherwise
  # constant-fold the herding kernels of every device at compile time.
  batched = jax.jit(lambda fp, sub: jax.vmap(one, in_axes=(None, 0))(fp, sub).mean())
  sub = {"context": val_feats["context"], "query": val_feats["query"],
         "device_id": val_feats["device_id"], "type_q": val_feats["type_q"]}

  def score(fda_params):
    return batched(fda_params, sub)

  return score


def make_optimizer(fc):
  if fc.learning_rate <= 0:
    raise ValueError(f"fda.learning_rate must be > 0, got {fc.learning_rate}")
  sched = optax.warmup_cosine_decay_schedule(0.0, fc.learning_rate, max(1, fc.warmup_steps),
                                             max(2, fc.num_steps))
  return optax.chain(optax.clip_by_global_norm(fc.grad_clip),
                     optax.adamw(sched, weight_decay=fc.weight_decay))


def train_fda(model, fda, base_params, cfg, val_feats, workdir, metrics, summary=None):
  """Meta-trains (or resumes, or reloads) the FDA; returns the validation-selected params."""
  fc = cfg.fda
  anchor_dim = 2 * cfg.model.embed_dim
  fda_params = fda_lib.init(fda, jax.random.key(cfg.seed + 1), anchor_dim)
  tx = make_optimizer(fc)
  validate = make_validator(model, fda, base_params, val_feats, cfg, summary)
  state = {"fda_params": fda_params, "opt_state": tx.init(fda_params), "step": jnp.int32(0),
           "best_params": fda_params, "best_score": jnp.float32(-1.0),
           "best_step": jnp.int32(0)}
  with checkpointing.StageCheckpointer(workdir, STAGE, cfg.train.keep_checkpoints) as ckpt:
    state, start = ckpt.resume(state, fc.num_steps)
    if start >= fc.num_steps:
      return state["best_params"], _summary(state)
    if start == 0:
      s0 = float(validate(state["fda_params"]))               # the zero edit = global
      state = dict(state, best_score=jnp.float32(s0))
      metrics.write(STAGE, 0, val_accuracy=s0)
      logging.info("fda step 0 (zero edit) val accuracy %.4f", s0)
    t = time.time()
    type_q = jnp.asarray(val_feats["type_q"][0])
    pool = encode_meta_pool(model, base_params, cfg.data, fc, summary=summary, type_q=type_q)
    logging.info("fda: encoded %d fresh meta devices in %.1fs", fc.meta_devices, time.time() - t)
    groups = tuple(tuple(g) for g in fda.answer_groups)
    step_fn = make_meta_step(model, fda, base_params, fc, groups, tx)
    key = jax.random.key(cfg.seed + 2)
    t0, last_good = time.time(), ckpt.latest_step()
    for step in range(start, fc.num_steps):
      state, m = step_fn(state, episode_batch(pool, fc, cfg.seed, step),
                         jax.random.fold_in(key, step))
      if not np.isfinite(float(m["loss"])):
        raise NonFiniteError(
            f"FDA meta-training produced a non-finite loss at step {step + 1}; last good "
            f"checkpoint: step {last_good} in {ckpt.directory}. Lower fda.learning_rate.")
      done = step + 1
      row = {}
      if done % fc.eval_every == 0 or done == fc.num_steps:
        score = float(validate(state["fda_params"]))
        row["val_accuracy"] = score
        if score > float(state["best_score"]):
          state = dict(state, best_params=state["fda_params"], best_score=jnp.float32(score),
                       best_step=jnp.int32(done))
      if done % fc.log_every == 0 or done == fc.num_steps or row:
        rate = (done - start) / max(time.time() - t0, 1e-9)
        metrics.write(STAGE, done, **{k: v for k, v in m.items()}, **row, steps_per_s=rate,
                      eta_s=(fc.num_steps - done) / max(rate, 1e-9))
        logging.info("fda step %d/%d loss %.4f task %.4f aux %.4f qacc %.3f%s | %.1f steps/s",
                     done, fc.num_steps, float(m["loss"]), float(m["task_loss"]),
                     float(m["aux_loss"]), float(m["query_accuracy"]),
                     f" val {row['val_accuracy']:.4f}" if row else "", rate)
      if done % fc.checkpoint_every == 0 or done == fc.num_steps or preemption.requested():
        ckpt.save(done, state, {"stage": STAGE, "step": done})
        last_good = done
      if preemption.requested():
        ckpt.close()
        raise preemption.Preempted(f"fda: preempted (SIGTERM); saved step {done} in "
                                   f"{ckpt.directory}; rerun the same command to resume")
  return state["best_params"], _summary(state)


def _summary(state):
  return {"best_step": int(state["best_step"]), "best_val_accuracy": float(state["best_score"]),
          "steps": int(state["step"])}
