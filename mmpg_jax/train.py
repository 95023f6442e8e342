"""Stage 1: cloud training of the global device model on the pooled cloud data.

`train_step(state, batch, rng) -> (state, metrics)` is pure and jitted; batch i comes from
`Benchmark.global_batches(...)[i]`, a function of (seed, i) only, and the RNG is folded with
the step, so a run resumed from a checkpoint continues exactly where it stopped.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmpg_jax import checkpointing, preemption
from mmpg_jax.data import moving_digits as md

STAGE = "global"


class NonFiniteError(FloatingPointError):
  """A training step produced NaN or Inf."""


def init_params(model, data_cfg, seed: int):
  t, s, q = data_cfg.frames, data_cfg.size, data_cfg.question_len
  video = jnp.zeros((1, t, s, s), jnp.uint8)
  question = jnp.ones((1, q), jnp.int32)
  return model.init(jax.random.key(seed), video, question)["params"]


def make_optimizer(train_cfg):
  if train_cfg.learning_rate <= 0:
    raise ValueError(f"train.learning_rate must be > 0, got {train_cfg.learning_rate}")
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, train_cfg.learning_rate, max(1, train_cfg.warmup_steps), max(2, train_cfg.num_steps))
  return optax.adamw(schedule, weight_decay=train_cfg.weight_decay)


def qa_loss(model, params, batch):
  """Cross-entropy over every question type of every video (one frame encoding per video)."""
  frame_emb = model.apply({"params": params}, batch["video"], method=model.encode_frames)
  q_code = model.apply({"params": params}, batch["questions"], method=model.encode_question)
  nq = batch["questions"].shape[1]
  frame_emb = jnp.broadcast_to(frame_emb[:, None], (frame_emb.shape[0], nq) + frame_emb.shape[1:])
  logits = model.apply({"params": params}, frame_emb, q_code, method=model.answer_from_features)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answers"]).mean()
  acc = (logits.argmax(-1) == batch["answers"]).mean()
  return loss, acc


def make_train_step(model, tx):
  def train_step(state, batch, rng):
    del rng  # the device model has no dropout; kept so every stage has the same signature
    (loss, acc), grads = jax.value_and_grad(
        lambda p: qa_loss(model, p, batch), has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}
  # No buffer donation: an async orbax save may still be reading the previous state.
  return jax.jit(train_step)


def answer_prior(bench, max_examples: int = 4096) -> np.ndarray:
  """Frequency of each answer in the cloud training data (EM's source prior), add-one
  smoothed. Every question type is trained on every video, so this is what the model saw."""
  src = bench.global_source()
  idx = np.linspace(0, len(src) - 1, min(len(src), max_examples)).astype(int)
  answers = np.concatenate([np.asarray(src[int(i)]["answers"]).ravel() for i in idx])
  counts = np.bincount(answers, minlength=md.NUM_ANSWERS) + 1.0
  return (counts / counts.sum()).astype(np.float32)


def train_global(model, config, bench, workdir, metrics) -> dict:
  """Trains (or resumes, or reloads a finished) global model; returns its params."""
  tc = config.train
  tx = make_optimizer(tc)
  params = init_params(model, config.data, config.seed)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  batches = bench.global_batches(tc.batch_size, seed=config.seed)
  with checkpointing.StageCheckpointer(workdir, STAGE, tc.keep_checkpoints) as ckpt:
    state, start = ckpt.resume(state, tc.num_steps)
    if start >= tc.num_steps:
      return state["params"]
    step_fn = make_train_step(model, tx)
    key = jax.random.key(config.seed)
    t0, last_good = time.time(), ckpt.latest_step()
    for step in range(start, tc.num_steps):
      batch = batches[step]
      state, m = step_fn(state, batch, jax.random.fold_in(key, step))
      if not np.isfinite(float(m["loss"])):
        raise NonFiniteError(
            f"global training produced a non-finite loss ({float(m['loss'])}) at step {step + 1}; "
            f"last good checkpoint: step {last_good} in {ckpt.directory}. Lower "
            f"train.learning_rate or check the data; rerunning resumes from that checkpoint.")
      done = step + 1
      if done % tc.log_every == 0 or done == tc.num_steps:
        rate = (done - start) / max(time.time() - t0, 1e-9)
        eta = (tc.num_steps - done) / max(rate, 1e-9)
        metrics.write(STAGE, done, loss=m["loss"], accuracy=m["accuracy"],
                      grad_norm=m["grad_norm"], steps_per_s=rate, eta_s=eta)
        logging.info("global step %d/%d loss %.4f acc %.3f | %.1f steps/s, ETA %.0fs", done,
                     tc.num_steps, float(m["loss"]), float(m["accuracy"]), rate, eta)
      if done % tc.checkpoint_every == 0 or done == tc.num_steps or preemption.requested():
        ckpt.save(done, state, {"stage": STAGE, "step": done, "loss": float(m["loss"])})
        last_good = done
      if preemption.requested():
        ckpt.close()
        raise preemption.Preempted(f"global: preempted (SIGTERM); saved step {done} in "
                                   f"{ckpt.directory}; rerun the same command to resume")
  return state["params"]
