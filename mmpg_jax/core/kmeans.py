"""k-means in JAX (pure, jittable): Persona's prototypes (adapt/persona/) and the devices a
real video dataset without categories is split into (data/video_devices.py)."""
import jax
import jax.numpy as jnp


def kmeans(x, k: int, iterations: int, key):
  """k-means++ seeding, then `iterations` Lloyd steps: (centres [k, C], assignment [n])."""
  centres = lloyd(x, kmeanspp(x, k, key), iterations)
  return centres, jnp.argmin(sqdist(x, centres), axis=1)


def kmeanspp(x, k: int, key):
  """k-means++ seeding: each next centre drawn with probability ∝ squared distance."""
  n = x.shape[0]
  first = jax.random.randint(key, (), 0, n)
  centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])

  def seed(i, c):
    d2 = jnp.min(jnp.where(jnp.arange(k)[None] < i, sqdist(x, c), jnp.inf), axis=1)
    j = jax.random.choice(jax.random.fold_in(key, i), n, p=d2 / jnp.maximum(d2.sum(), 1e-12))
    return c.at[i].set(x[j])

  return jax.lax.fori_loop(1, k, seed, centres)


def lloyd(x, centres, iterations: int):
  """Lloyd steps from `centres`; an empty cluster keeps its centre."""
  k = centres.shape[0]

  def step(_, c):
    onehot = jax.nn.one_hot(jnp.argmin(sqdist(x, c), axis=1), k)
    count = onehot.sum(0)
    mean = onehot.T @ x / jnp.maximum(count, 1.0)[:, None]
    return jnp.where(count[:, None] > 0, mean, c)

  return jax.lax.fori_loop(0, iterations, step, centres)


def sqdist(x, c):
  return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
