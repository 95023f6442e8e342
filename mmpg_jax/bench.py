r"""Benchmarks: figures and ratios measured side by side in one run, printed as JSON.

  python -m mmpg_jax.bench --what=generate [--num_devices=1024 --device_batch=256]
      cloud edit generation for many devices: a Python loop over devices (jitted generate per
      device) vs jit(vmap(generate)) in fixed chunks vs the same sharded over every
      accelerator (NamedSharding over a Mesh). Devices/s and speed-ups.
  python -m mmpg_jax.bench --what=adr [--k=16]
      on-device anchor selection: time per device of each ADR selector, jitted.

Model sizes and the task (its upload's modalities) come from --config (default: the default
experiment); parameter values are random (timings do not depend on them). Set XLA_FLAGS=--xla_force_host_platform_device_count=8 to see
the sharded path spread over 8 simulated CPU devices.
"""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mmpg_jax import generate, tasks
from mmpg_jax.adapt import adr
from mmpg_jax.adapt import fda as fda_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moving_digits_qa.py",
                                          "experiment config", lock_config=True)
_WHAT = flags.DEFINE_enum("what", "generate", ["generate", "adr"], "which benchmark")
_N = flags.DEFINE_integer("num_devices", 1024, "simulated devices to generate edits for")
_BATCH = flags.DEFINE_integer("device_batch", 256, "devices per compiled chunk")
_K = flags.DEFINE_integer("k", 16, "anchors per device")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats (best is reported)")


def _best_time(fn, repeats):
  fn()                                              # compile / warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def _fda(cfg):
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, 0)
  prior = None
  if task.label_groups:
    a = max(hi for _, hi in task.label_groups)
    prior = np.full(a, 1.0 / a)
  fda = fda_lib.from_config(cfg, task, params, prior, task.anchor_dims(model, params))
  fp = fda_lib.init(fda, jax.random.key(0))
  fp = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), fp)
  return task, model, params, fda, fp


def _uploads(fda, n, k):
  keys = iter(jax.random.split(jax.random.key(2), 8))
  up = {"anchors": {m: np.asarray(jax.random.normal(next(keys), (n, k, d)), np.float32)
                    for m, d in fda.modalities},
        "weights": {m: np.full((n, k), 1.0 / k, np.float32) for m, _ in fda.modalities}}
  if fda.summary_dim:
    up["summary"] = np.asarray(0.1 * jax.random.normal(next(keys), (n, fda.summary_dim)),
                               np.float32)
  return up


def bench_generate(cfg):
  _, _, _, fda, fp = _fda(cfg)
  n, k = _N.value, _K.value
  up = _uploads(fda, n, k)
  one = jax.jit(lambda p, u: fda_lib.generate(fda, p, u))
  n_loop = min(n, 128)                              # the loop is slow; time a slice, scale
  t_loop = _best_time(lambda: [one(fp, jax.tree.map(lambda x: x[i], up))
                               for i in range(n_loop)], 1) * n / n_loop
  single = generate.EditGenerator(fda, fp, _BATCH.value,
                                  mesh=generate.make_mesh(jax.devices()[:1]))
  t_vmap = _best_time(lambda: single(up, validate=False), _REPEATS.value)
  sharded = generate.EditGenerator(fda, fp, _BATCH.value)
  t_shard = _best_time(lambda: sharded(up, validate=False), _REPEATS.value)
  t_checked = _best_time(lambda: sharded(up, validate=True), 1)
  return {"benchmark": "generate", "task": cfg.task, "num_devices": n, "k": k,
          "modalities": [m for m, _ in fda.modalities], "device_batch": _BATCH.value,
          "accelerators": jax.device_count(), "backend": jax.default_backend(),
          "devices_per_s": {"loop": n / t_loop, "jit_vmap_1_accelerator": n / t_vmap,
                            "jit_vmap_sharded": n / t_shard,
                            "jit_vmap_sharded_with_upload_checks": n / t_checked},
          "speedup_vmap_over_loop": t_loop / t_vmap,
          "speedup_sharded_over_loop": t_loop / t_shard,
          "speedup_sharded_over_vmap": t_vmap / t_shard}


def bench_adr(cfg):
  """ADR on the primary modality's elements of random contexts (64 devices)."""
  task, model, params, _, _ = _fda(cfg)
  ctx = task.example_features(model, params, cfg.data.context_size)
  ctx = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), (64,) + x.shape)
                     if x.dtype.kind == "f" else jnp.broadcast_to(x, (64,) + x.shape), ctx)
  mod = next(iter(task.anchor_dims(model, params)))
  el = jax.vmap(lambda c: task.anchor_elements(c)[mod])(ctx)
  out = {"benchmark": "adr", "task": cfg.task, "modality": mod, "k": _K.value,
         "elements": int(el.shape[1]), "devices": 64, "ms_per_device": {}, "mmd2": {}}
  for sel in adr.SELECTORS:
    fn = jax.jit(jax.vmap(lambda c: adr.select(task.anchor_elements(c)[mod], _K.value, sel,
                                               jax.random.key(0))))
    out["ms_per_device"][sel] = 1e3 * _best_time(lambda: fn(ctx), _REPEATS.value) / 64
    a, wt = fn(ctx)
    out["mmd2"][sel] = float(jnp.mean(jax.vmap(adr.mmd2)(a, wt, el)))
  out["herding_vs_random_mmd_ratio"] = out["mmd2"]["herding"] / out["mmd2"]["random"]
  return out


def main_(argv):
  del argv
  cfg = _CONFIG.value
  res = bench_generate(cfg) if _WHAT.value == "generate" else bench_adr(cfg)
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  app.run(main_)
