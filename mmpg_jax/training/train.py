"""One stage loop for every training stage (the global model, a hypernetwork's meta-training).

`run_stage` owns what every stage needs: resume from the stage's newest intact checkpoint, a
pure jitted `step(state, batch, rng) -> (state, metrics)` with batch i = `batch_fn(i)` (a
function of the step only) and the RNG folded with the step, a NaN/Inf guard, metrics with
steps/s and ETA, periodic checkpoints, and SIGTERM -> checkpoint -> exit. A run resumed from a
checkpoint therefore continues exactly where it stopped.

Stage 1 (`train_global`): the task's global loss on the pooled cloud data. With
`train.eval_every` > 0 the global model is scored on the validation devices every that many
steps (and at the last step), the best-scoring parameters are kept (training length chosen on
validation, never on test) and the validation curve travels in the stage's state, so a resumed
run reports the whole curve; `eval_every` 0 keeps the last step's model.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmpg_jax.core import checkpointing, preemption, timing
from mmpg_jax.tasks import capabilities

STAGE = "global"


class NonFiniteError(FloatingPointError):
  """A training step produced NaN or Inf."""


SCHEDULES = ("cosine", "constant")


def make_optimizer(sc, key: str):
  """AdamW on a warmup schedule (+ global-norm clipping where `sc.grad_clip` is set): linear
  warmup, then cosine decay to 0 (`sc.schedule` "cosine", the default) or the peak rate held
  ("constant", as the official recommendation code's Adam). `sc` is a stage config
  (learning_rate, warmup_steps, num_steps, weight_decay[, schedule]); `key` names it in
  errors."""
  if sc.learning_rate <= 0:
    raise ValueError(f"{key}.learning_rate must be > 0, got {sc.learning_rate}")
  kind = sc.get("schedule", "cosine")
  if kind not in SCHEDULES:
    raise ValueError(f"{key}.schedule must be one of {SCHEDULES}, got {kind!r}")
  warmup = max(1, sc.warmup_steps)
  if kind == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, sc.learning_rate, warmup,
                                                  max(2, sc.num_steps))
  else:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, sc.learning_rate, warmup),
                                     optax.constant_schedule(sc.learning_rate)], [warmup])
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


def run_stage(stage: str, state, sc, **kwargs):
  """Trains `state` (a dict with 'step') for `sc.num_steps` steps, resuming if the stage has
  checkpoints (`_run_stage`'s keywords). `prepare(state, start) -> (state, step_fn, batch_fn)`
  runs only when there is work left (compile, encode data); `after_step(state, done) ->
  (state, row)` may evaluate and return extra metrics to log. Returns the final state. Its
  wall time is the run's time table's row `stage`."""
  with timing.span(stage):
    return _run_stage(stage, state, sc, **kwargs)


def _run_stage(stage: str, state, sc, *, workdir, metrics, key, prepare, after_step=None,
               hint: str = "", keep: int = 2):
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


def device_metrics(task, model, params_of, names=None):
  """`params_of(net, dev) -> device params` -> a jitted `(net, feats) -> {metric: mean over
  devices}` of the per-device metrics `names` (default: every one `task.metric_values`
  returns, its keys without a leading '_'), one vmap over the devices. The devices are an
  argument, not a closed-over constant (XLA would otherwise constant-fold per-device work at
  compile time)."""

  def one(net, dev):
    query = dev[task.query_role]
    values = task.metric_values(task.scores(model, params_of(net, dev), query), query)
    return {k: v for k, v in values.items()
            if (k in names if names is not None else not k.startswith("_"))}

  return jax.jit(lambda net, feats: jax.tree.map(
      jnp.mean, jax.vmap(one, in_axes=(None, 0))(net, feats)))


def selects_on_validation(config) -> bool:
  return int(config.train.get("eval_every", 0) or 0) > 0


def evaluations(num_steps: int, every: int) -> int:
  """Validation points after step 0: every `every` steps and the last step."""
  return -(-int(num_steps) // int(every))


def new_curve(points: int, names) -> dict:
  """An empty validation curve for a stage's checkpointed state: 'step' and one array per
  metric name, NaN until that point is evaluated (a resumed stage reports the whole curve)."""
  return {"step": jnp.zeros(points, jnp.int32),
          **{k: jnp.full(points, jnp.nan, jnp.float32) for k in names}}


def record_point(curve, i: int, step: int, values: dict) -> dict:
  out = dict(curve, step=curve["step"].at[i].set(step))
  for k, v in values.items():
    out[k] = curve[k].at[i].set(v)
  return out


def curve_lists(curve) -> dict:
  """The evaluated points of a curve as lists (results.json, the report)."""
  c = jax.tree.map(np.asarray, curve)
  done = np.isfinite(c[next(k for k in c if k != "step")])
  return {k: [int(x) for x in v[done]] if k == "step" else [round(float(x), 6) for x in v[done]]
          for k, v in c.items()}


def initial_state(task, model, config):
  """(optimiser, stage-1 state before step 1): also the restore target of its checkpoints.
  With validation selection the state also holds the best parameters so far, their step and
  score, and the validation curve (every per-device metric at each validation point)."""
  tx = make_optimizer(config.train, "train")
  params = task.init_params(model, config.seed)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  if selects_on_validation(config):
    state.update(best_params=params, best_score=jnp.float32(-np.inf), best_step=jnp.int32(0),
                 curve=new_curve(evaluations(config.train.num_steps, config.train.eval_every),
                                 curve_metrics(task)))
  return tx, state


def curve_metrics(task) -> tuple:
  """The per-device metrics a validation curve records: the task's metrics but those pooled
  over every row (`task.pooled_metrics`, which need all rows' scores)."""
  pooled = capabilities.pooled_metrics(task)
  return tuple(m.name for m in task.metrics if m.name not in pooled)


def final_params(state, config):
  """The parameters stage 1 hands on: the validation-best with selection, else the last."""
  return state["best_params"] if selects_on_validation(config) else state["params"]


def train_global(task, model, config, data, workdir, metrics):
  """Trains (or resumes, or reloads a finished) global model; returns (its params, summary):
  the validation-selected params and the curve with `train.eval_every` > 0 (summary {}
  otherwise)."""
  tc = config.train
  tx, state = initial_state(task, model, config)
  select = selects_on_validation(config)
  metric = task.selection_metric
  sign = 1.0 if metric.higher_is_better else -1.0
  cache = {}

  def prepare(state, start):
    batches = data.global_batches(tc.batch_size, seed=config.seed)
    step_fn = make_train_step(lambda p, b: task.global_loss(model, p, b), tx)
    if select:
      # the oracle role (the largest) is never scored here: not encoded at every validation
      cache["val"] = {k: v for k, v in data.devices("validation").items()
                      if k != task.oracle_role}
      cache["score"] = device_metrics(task, model, lambda net, dev: net)
    return state, step_fn, lambda step: batches[step]

  def after_step(state, done):
    if done % tc.eval_every and done != tc.num_steps:
      return state, {}
    params = state["params"]
    feats = task.encode_split(model, params, cache["val"])
    feats = {k: v for k, v in feats.items() if k not in (task.support_role, task.oracle_role)}
    out = cache["score"](params, feats)
    values = {k: float(out[k]) for k in curve_metrics(task)}
    state = dict(state, curve=record_point(state["curve"], evaluations(done, tc.eval_every) - 1,
                                           done, values))
    score = sign * values[metric.name]
    if score > float(state["best_score"]):
      state = dict(state, best_params=params, best_score=jnp.float32(score),
                   best_step=jnp.int32(done))
    return state, {f"val_{k}": v for k, v in values.items()}

  state = run_stage(STAGE, state, tc, workdir=workdir, metrics=metrics,
                    key=jax.random.key(config.seed), prepare=prepare,
                    after_step=after_step if select else None, keep=tc.keep_checkpoints,
                    hint="Lower train.learning_rate or check the data;")
  if not select:
    return state["params"], {}
  summary = {"metric": metric.name, "best_step": int(state["best_step"]),
             "steps": int(state["step"]), "curve": curve_lists(state["curve"])}
  logging.info("global model: validation %s best at step %d of %d", metric.name,
               summary["best_step"], summary["steps"])
  return final_params(state, config), summary
