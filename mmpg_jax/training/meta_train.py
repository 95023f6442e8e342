"""What every cloud meta-training stage shares, for any task and any hypernetwork.

A stage meta-trains a cloud network (the FDA, DUET's generator, Persona's editors, the router)
on simulated meta devices, never seen by the global model (the task's meta devices are
disjoint from its cloud training data), and keeps the parameters that score best on the
validation devices. This module gives such a stage its parts:
  encode_devices   render and encode meta devices once, in fixed-size chunks (one compile;
                   the next chunk rendered while one is encoded), with progress, rate and
                   ETA, honouring SIGTERM; with a workdir, once per run (meta_pool.py);
  pool_batch       a step's devices of an encoded pool: a per-epoch permutation, so every
                   device is used once before any repeats (a function of seed and step only);
  validator        the mean selection metric on validation devices of any `params_of(net,
                   device)`, signed so that higher is better;
  train_selected   the loop: AdamW, validation at step 0 and every `eval_every` steps, the
                   best parameters and the validation curve kept, resumed and checkpointed
                   by `train.run_stage`.
"""
import concurrent.futures
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmpg_jax.core import preemption, timing
from mmpg_jax.data import threads as data_threads
from mmpg_jax.training import meta_pool, train


def encode_devices(task, model, params, ids, query_size: int, extra=None, *,
                   what: str = "meta devices", chunk_devices: int = 64,
                   context_size: int | None = None, workdir: str | None = None) -> dict:
  """Renders and encodes the meta-distribution devices `ids` (`task.meta_devices`,
  `task.encode_meta`) in fixed-size chunks (one compile), honouring SIGTERM after each chunk and
  logging progress with its rate and ETA; with a `workdir`, a pool of them is built once per
  run and stored there (meta_pool.cached: every later stage that reads the same devices with
  the same encoder reads it). `extra(params, encoded) -> dict` adds per-device arrays computed
  from the encoded pool (vmapped over a chunk by the caller's function; never stored: they
  depend on more than the encoder); `context_size` renders fewer context samples than the
  devices have (a stage that reads only the query)."""
  encode = lambda part: _encode_chunks(task, model, params, part, query_size, what=what,
                                       chunk_devices=chunk_devices, context_size=context_size)
  with timing.span(f"encode {what}"):
    pool = meta_pool.cached(encode, task, params, ids, query_size, workdir=workdir,
                            context_size=context_size, what=what)
    if extra is None:
      return pool
    return {**pool, **map_chunks(lambda enc: extra(params, enc), pool, chunk_devices)}


def map_chunks(fn, pool, chunk_devices: int = 64) -> dict:
  """jit(fn) over a pool's devices in fixed-size chunks (the last padded: one compile),
  fetched to the host and concatenated."""
  n = len(jax.tree.leaves(pool)[0])
  size = max(1, min(chunk_devices, n))
  jitted = jax.jit(fn)
  parts = []
  for s in range(0, n, size):
    idx = np.minimum(np.arange(s, s + size), n - 1)
    out = jax.tree.map(np.asarray, jitted(jax.tree.map(lambda v: v[idx], pool)))
    parts.append(jax.tree.map(lambda v: v[:min(size, n - s)], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _encode_chunks(task, model, params, ids, query_size, *, what, chunk_devices,
                   context_size):
  """encode_devices' rendering and encoding (no store, no extras)."""
  enc = jax.jit(lambda p, raw: task.encode_meta(model, p, raw))
  ids = [int(i) for i in ids]
  n = len(ids)
  chunk_devices = max(1, min(chunk_devices, n))   # a small set is not padded to a full chunk
  chunks = []
  for s in range(0, n, chunk_devices):
    part = ids[s:s + chunk_devices]
    chunks.append(part + [part[-1]] * (chunk_devices - len(part)))   # fixed shapes: one compile
  parts = []
  t0, last_log = time.time(), time.time()
  # Host threads render chunk i+1 while chunk i is encoded (the main thread only dispatches
  # and waits), each thread a slice of the chunk: numpy's noise draws and scipy's filters
  # release the GIL, so on 2 cores two threads render ~1.7x faster than one. Each device is
  # a function of its id alone: the slices concatenated are the chunk rendered whole.
  threads = max(1, min(data_threads.render_threads(), chunk_devices))
  with concurrent.futures.ThreadPoolExecutor(threads) as renderer:
    # a task written before `context_size` existed renders its full context
    takes = "context_size" in inspect.signature(task.meta_devices).parameters
    more = {"context_size": context_size} if context_size is not None and takes else {}
    render = lambda part: task.meta_devices(part, query_size, **more)

    def submit(chunk, ways):
      parts = [p.tolist() for p in np.array_split(np.asarray(chunk), ways) if len(p)]
      return [renderer.submit(render, p) for p in parts]

    # the first chunk in one thread: it fills the task's lazy caches (prepared data, digit
    # pools) before any two threads could race to fill them
    pending = submit(chunks[0], 1)
    for i, s in enumerate(range(0, n, chunk_devices)):
      pieces = [f.result() for f in pending]
      raw = pieces[0] if len(pieces) == 1 else jax.tree.map(
          lambda *xs: np.concatenate(xs), *pieces)
      if i + 1 < len(chunks):
        pending = submit(chunks[i + 1], threads)
      f = jax.tree.map(np.asarray, enc(params, raw))
      parts.append(jax.tree.map(lambda v: v[:min(chunk_devices, n - s)], f))
      done = min(n, s + chunk_devices)
      if preemption.requested():      # minutes of encoding: stop now, nothing to save yet
        raise preemption.Preempted(f"preempted (SIGTERM) while encoding {what} ({done}/{n}); "
                                   f"they are recomputed on rerun, which resumes from the last "
                                   f"checkpoint")
      if time.time() - last_log > 10 or done == n:
        rate = done / max(time.time() - t0, 1e-9)
        logging.info("encoded %d/%d %s | %.1f devices/s, ETA %.0fs", done, n, what, rate,
                     (n - done) / max(rate, 1e-9))
        last_log = time.time()
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def pool_batch(pool, n_per_step: int, seed: int, step: int, salt: int = 7) -> dict:
  """The `n_per_step` pool devices of a step: a per-epoch permutation (every device once before
  any repeats), a function of (seed, salt, step) only; `salt` gives a stage its own order."""
  n = len(jax.tree.leaves(pool)[0])
  per_epoch = max(n // n_per_step, 1)
  epoch, pos = divmod(step, per_epoch)
  ids = np.random.default_rng([seed, salt, epoch]).permutation(n)[
      pos * n_per_step:(pos + 1) * n_per_step]
  return jax.tree.map(lambda v: v[ids], pool)


def validator(task, model, val_feats, params_of):
  """`params_of(net, dev) -> device params` -> `validate(net)`: the mean selection metric on
  validation devices, signed so that higher is better (`train.device_metrics`)."""
  metric = task.selection_metric
  sign = 1.0 if metric.higher_is_better else -1.0
  score = train.device_metrics(task, model, params_of, names=(metric.name,))
  sub = {k: v for k, v in val_feats.items() if k not in (task.support_role, task.oracle_role)}
  return lambda net: sign * score(net, sub)[metric.name]


def selected_state(params0, sc, key: str = "fda_params", what: str = "fda"):
  """(optimiser, the state before step 1) of a validation-selected meta-training stage: the
  trained parameters under `key`, their optimiser state, the best-scoring parameters so far
  and the validation curve (step 0 and every validation point; `train.new_curve`), also the
  restore target of the stage's checkpoints."""
  tx = train.make_optimizer(sc, what)
  return tx, {key: params0, "opt_state": tx.init(params0), "step": jnp.int32(0),
              "best_params": params0, "best_score": jnp.float32(-np.inf),
              "best_step": jnp.int32(0),
              "curve": train.new_curve(1 + train.evaluations(sc.num_steps, sc.eval_every),
                                       ("score",))}


def curve_of(state, metric: str) -> dict:
  """The validation curve of a selected stage's state: {'step': [...], metric: [...]} (the
  score as `validate` signs it: higher is better)."""
  c = train.curve_lists(state["curve"])
  return {"step": c["step"], metric: c["score"]}


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
      state = dict(state, best_score=jnp.float32(s0),
                   curve=train.record_point(state["curve"], 0, 0, {"score": s0}))
      metrics.write(stage, 0, **{f"val_{metric}": s0})
      logging.info("%s step 0 (initial parameters) val %s %.4f", stage, metric, s0)
    batch_fn = make_batches()
    return state, train.make_train_step(loss_fn, tx, key=key), batch_fn

  def after_step(state, done):
    if done % sc.eval_every and done != sc.num_steps:
      return state, {}
    score = float(validate(state[key]))
    state = dict(state, curve=train.record_point(
        state["curve"], train.evaluations(done, sc.eval_every), done, {"score": score}))
    if score > float(state["best_score"]):
      state = dict(state, best_params=state[key], best_score=jnp.float32(score),
                   best_step=jnp.int32(done))
    return state, {f"val_{metric}": score}

  state = train.run_stage(stage, state, sc, workdir=workdir, metrics=metrics,
                          key=jax.random.key(cfg.seed + 2), prepare=prepare,
                          after_step=after_step, keep=cfg.train.keep_checkpoints, hint=hint)
  return state["best_params"], {"best_step": int(state["best_step"]),
                                f"best_val_{metric}": float(state["best_score"]),
                                "steps": int(state["step"]),
                                "metric": metric, "curve": curve_of(state, metric)}
