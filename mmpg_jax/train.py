"""One stage loop for every training stage (the global model, a hypernetwork's meta-training).

`run_stage` owns what every stage needs: resume from the stage's newest intact checkpoint, a
pure jitted `step(state, batch, rng) -> (state, metrics)` with batch i = `batch_fn(i)` (a
function of the step only) and the RNG folded with the step, a NaN/Inf guard, metrics with
steps/s and ETA, periodic checkpoints, and SIGTERM -> checkpoint -> exit. A run resumed from a
checkpoint therefore continues exactly where it stopped.

Stage 1 (`train_global`): the task's global loss on the pooled cloud data.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmpg_jax import checkpointing, preemption

STAGE = "global"


class NonFiniteError(FloatingPointError):
  """A training step produced NaN or Inf."""


def make_optimizer(sc, key: str):
  """AdamW on a warmup-cosine schedule (+ global-norm clipping where `sc.grad_clip` is set).
  `sc` is a stage config (learning_rate, warmup_steps, num_steps, weight_decay); `key` names
  it in errors."""
  if sc.learning_rate <= 0:
    raise ValueError(f"{key}.learning_rate must be > 0, got {sc.learning_rate}")
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, sc.learning_rate, max(1, sc.warmup_steps), max(2, sc.num_steps))
  opt = optax.adamw(schedule, weight_decay=sc.weight_decay)
  if sc.get("grad_clip"):
    opt = optax.chain(optax.clip_by_global_norm(sc.grad_clip), opt)
  return opt


def make_train_step(loss_fn, tx, key: str = "params"):
  """A pure jitted step: `loss_fn(params, batch) -> (loss, metrics)` minimised over
  `state[key]` with `tx`. Returns the metrics with `loss` and `grad_norm` added."""

  def step(state, batch, rng):
    del rng  # no stage draws randomness inside a step; kept so every stage has one signature
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state[key], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state[key])
    new = dict(state, **{key: optax.apply_updates(state[key], updates)}, opt_state=opt_state,
               step=state["step"] + 1)
    return new, dict(m, loss=loss, grad_norm=optax.tree.norm(grads))

  # No buffer donation: an async orbax save may still be reading the previous state.
  return jax.jit(step)


def run_stage(stage: str, state, sc, *, workdir, metrics, key, prepare, after_step=None,
              hint: str = "", keep: int = 2):
  """Trains `state` (a dict with 'step') for `sc.num_steps` steps, resuming if the stage has
  checkpoints. `prepare(state, start) -> (state, step_fn, batch_fn)` runs only when there is
  work left (compile, encode data); `after_step(state, done) -> (state, row)` may evaluate and
  return extra metrics to log. Returns the final state."""
  with checkpointing.StageCheckpointer(workdir, stage, keep) as ckpt:
    state, start = ckpt.resume(state, sc.num_steps)
    if start >= sc.num_steps:
      return state
    state, step_fn, batch_fn = prepare(state, start)
    t0, last_good = time.time(), ckpt.latest_step()
    for step in range(start, sc.num_steps):
      state, m = step_fn(state, batch_fn(step), jax.random.fold_in(key, step))
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise NonFiniteError(
            f"{stage} training produced a non-finite loss ({loss}) at step {step + 1}; last good "
            f"checkpoint: step {last_good} in {ckpt.directory}. {hint} Rerunning resumes from "
            f"that checkpoint.")
      done = step + 1
      row = {}
      if after_step is not None:
        state, row = after_step(state, done)
      if done % sc.log_every == 0 or done == sc.num_steps or row:
        rate = (done - start) / max(time.time() - t0, 1e-9)
        eta = (sc.num_steps - done) / max(rate, 1e-9)
        metrics.write(stage, done, **m, **row, steps_per_s=rate, eta_s=eta)
        shown = " ".join(f"{k} {float(v):.4f}" for k, v in {**m, **row}.items()
                         if k != "grad_norm")
        logging.info("%s step %d/%d %s | %.1f steps/s, ETA %.0fs", stage, done, sc.num_steps,
                     shown, rate, eta)
      if done % sc.checkpoint_every == 0 or done == sc.num_steps or preemption.requested():
        ckpt.save(done, state, {"stage": stage, "step": done, "loss": loss})
        last_good = done
      if preemption.requested():
        ckpt.close()
        raise preemption.Preempted(f"{stage}: preempted (SIGTERM); saved step {done} in "
                                   f"{ckpt.directory}; rerun the same command to resume")
  return state


def initial_state(task, model, config):
  """(optimiser, stage-1 state before step 1): also the restore target of its checkpoints."""
  tx = make_optimizer(config.train, "train")
  params = task.init_params(model, config.seed)
  return tx, {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}


def train_global(task, model, config, data, workdir, metrics) -> dict:
  """Trains (or resumes, or reloads a finished) global model; returns its params."""
  tc = config.train
  tx, state = initial_state(task, model, config)

  def prepare(state, start):
    batches = data.global_batches(tc.batch_size, seed=config.seed)
    step_fn = make_train_step(lambda p, b: task.global_loss(model, p, b), tx)
    return state, step_fn, lambda step: batches[step]

  state = run_stage(STAGE, state, tc, workdir=workdir, metrics=metrics,
                    key=jax.random.key(config.seed), prepare=prepare, keep=tc.keep_checkpoints,
                    hint="Lower train.learning_rate or check the data;")
  return state["params"]
