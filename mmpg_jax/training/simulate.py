"""Simulated devices for cloud-side batch generation: as many as asked, made on the accelerator.

Rendering and encoding a device costs far more than generating its edit (the embedded
benchmark renders videos), so a million devices cannot each be rendered. Instead a *pool* of
`P` real meta-distribution devices is rendered and encoded once (`task.meta_devices` +
`task.encode_meta`, ids `[first_id, first_id + P)`: fresh devices that meta-training never
drew, since it uses ids `[0, fda.meta_devices)`), and simulated device `n` is

    pool device n mod P, with its unlabelled context resampled with replacement
    (key: fold_in(key(seed), n)); its labelled query is the pool device's own.

So the shifts (label prior, appearance, phrasing) vary across the P pool devices, and every
simulated device is a fresh sample of one of them: the context the device summarises and
selects anchors from differs from device to device. `device(...)` is pure and jit/vmap-able:
the streaming generator builds each chunk's devices on the accelerator, from their indices.
"""
import jax
import jax.numpy as jnp

from mmpg_jax.training import meta_train

RESAMPLE_STREAM = 0x5EED


def build_pool(task, model, params, fc, num_devices: int, chunk_devices: int = 64,
               workdir: str | None = None) -> dict:
  """The P rendered and encoded pool devices (context and query roles), fresh for the FDA;
  with a `workdir` (the run's), stored there once and read by every later generation."""
  ids = range(fc.meta_devices, fc.meta_devices + num_devices)
  return meta_train.encode_devices(task, model, params, ids, fc.meta_query_size,
                                   what="pool devices for generation",
                                   chunk_devices=chunk_devices, workdir=workdir)


def device(task, pool, n, seed, constants) -> dict:
  """Simulated device n (an int32 scalar, traced): a dict like an evaluated device's, with
  `device_id` n, the task's per-device constants, its resampled context and its query."""
  p = len(jax.tree.leaves(pool)[0])
  base = jax.tree.map(lambda x: jnp.asarray(x)[n % p], pool)
  ctx = base[task.context_role]
  size = jax.tree.leaves(ctx)[0].shape[0]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), RESAMPLE_STREAM), n)
  idx = jax.random.randint(key, (size,), 0, size)
  return {task.context_role: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), ctx),
          task.query_role: base[task.query_role], "device_id": jnp.asarray(n, jnp.int32),
          **constants}
