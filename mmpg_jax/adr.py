"""ADR: the AnchorFrame Distribution Reasoner, on the device, forward-only.

From the anchor elements of the device's recent unlabelled data (the task's
`anchor_elements`: for video, frame embeddings with their temporal differences; caption codes),
pick K anchors whose (weighted) distribution stays close to all of them, so a few KB describe
what the device sees.

Selectors (all pure; jit- and vmap-able with K static):
  herding   greedy kernel herding: each step adds the element that most reduces the MMD between
            the anchors and all elements (RBF kernel, median-heuristic bandwidth). Default.
  kcenter   greedy k-center (farthest point).
  kmeanspp  k-means++ seeding refined by Lloyd steps, snapped to medoids (real elements).
  uniform   evenly spaced in time over the context stream.
  random    K elements uniformly at random.
  all       every element (the upper bound on information, and on uplink bytes).
herding/kcenter/kmeanspp anchors carry the mass of the elements nearest to them (Voronoi cells
in kernel space); uniform/random/all anchors carry equal weights (they are plain samples).
"""
import jax
import jax.numpy as jnp
import numpy as np

SELECTORS = ("herding", "kcenter", "kmeanspp", "uniform", "random", "all")


def _sq_dists(x, y):
  d = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2.0 * x @ y.T
  return jnp.maximum(d, 0.0)


def _kth_smallest_bits(bits, k: int):
  """The k-th smallest (0-based) of non-negative float32 values given as their int32 bit
  patterns (which order like the floats): a bisection over the 31 value bits, counting."""

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    ok = (bits <= mid).sum() >= k + 1
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.int32(0), jnp.int32(0x7F800000)))
  return lo


def median_nonneg(v):
  """jnp.median of a 1-D array of non-negative floats, bit for bit, without sorting it.

  A sort of the ~25k pairwise distances of a 224-element context is what made ADR herding cost
  4 ms per device on a CPU core; counting passes are 6x faster under vmap (bench: adr)."""
  v = jnp.abs(v.astype(jnp.float32))                           # -0.0 -> 0.0: bits order
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  m = v.shape[0]
  lo_bits = _kth_smallest_bits(bits, (m - 1) // 2)
  lo = jax.lax.bitcast_convert_type(lo_bits, jnp.float32)
  if m % 2:
    return lo
  above = jnp.min(jnp.where(bits > lo_bits, v, jnp.inf))      # the next order statistic
  hi = jnp.where((bits <= lo_bits).sum() >= m // 2 + 1, lo, above)
  return (lo + hi) / 2


def median_bandwidth(x):
  """Median heuristic: the median pairwise squared distance (a robust kernel scale)."""
  n = x.shape[0]
  if n < 2:
    return jnp.float32(1.0)
  rows, cols = np.triu_indices(n, k=1)                          # static: n is a shape
  return jnp.maximum(median_nonneg(_sq_dists(x, x)[rows, cols]), 1e-6)


def rbf(x, y, bw):
  return jnp.exp(-_sq_dists(x, y) / bw)


def voronoi_mass(x, idx, active=None, bw=None):
  """Share of all elements whose most similar active anchor is each anchor."""
  bw = median_bandwidth(x) if bw is None else bw
  sim = rbf(x, x[idx], bw)                                     # [N, K]
  if active is not None:
    sim = jnp.where(active[None, :], sim, -1.0)
  owner = sim.argmax(-1)
  mass = jnp.zeros(idx.shape[0]).at[owner].add(1.0)
  return mass / x.shape[0]


def herding(x, k: int, k_active=None):
  """Greedy kernel herding. Returns (indices [k], weights [k]); with a traced `k_active` <= k
  only the first k_active anchors are chosen and weighted (the rest get weight 0)."""
  bw = median_bandwidth(x)
  kxx = rbf(x, x, bw)
  mean_emb = kxx.mean(1)
  n = x.shape[0]

  def body(t, carry):
    idx, taken, ksum = carry
    score = mean_emb - ksum / (t + 1.0)
    score = jnp.where(taken, -jnp.inf, score)
    j = jnp.argmax(score)
    return idx.at[t].set(j), taken.at[j].set(True), ksum + kxx[:, j]

  idx, _, _ = jax.lax.fori_loop(0, k, body, (jnp.zeros(k, jnp.int32), jnp.zeros(n, bool),
                                             jnp.zeros(n)))
  active = jnp.arange(k) < (k if k_active is None else k_active)
  return idx, voronoi_mass(x, idx, active, bw) * active


def kcenter(x, k: int):
  d = _sq_dists(x, x)
  start = jnp.argmin(d.sum(1))                                  # the most central element

  def body(t, carry):
    idx, mind = carry
    j = jnp.argmax(mind)
    return idx.at[t].set(j), jnp.minimum(mind, d[:, j])

  idx, _ = jax.lax.fori_loop(1, k, body, (jnp.zeros(k, jnp.int32).at[0].set(start), d[:, start]))
  return idx, voronoi_mass(x, idx)


def kmeanspp(x, k: int, key, lloyd_steps: int = 5):
  d = _sq_dists(x, x)
  n = x.shape[0]
  keys = jax.random.split(key, k)
  first = jax.random.randint(keys[0], (), 0, n)

  def seed(t, carry):
    idx, mind = carry
    p = mind / jnp.maximum(mind.sum(), 1e-12)
    j = jax.random.choice(keys[t], n, p=p)
    return idx.at[t].set(j), jnp.minimum(mind, d[:, j])

  idx, _ = jax.lax.fori_loop(1, k, seed, (jnp.zeros(k, jnp.int32).at[0].set(first), d[:, first]))
  centres = x[idx]
  for _ in range(lloyd_steps):
    owner = _sq_dists(x, centres).argmin(-1)
    onehot = jax.nn.one_hot(owner, k)                           # [N, K]
    count = onehot.sum(0)
    mean = (onehot.T @ x) / jnp.maximum(count, 1.0)[:, None]
    centres = jnp.where(count[:, None] > 0, mean, centres)
  idx = _sq_dists(centres, x).argmin(-1)                        # medoid: nearest real element
  return idx, voronoi_mass(x, idx)


def uniform(x, k: int):
  n = x.shape[0]
  idx = jnp.floor((jnp.arange(k) + 0.5) * n / k).astype(jnp.int32)
  return idx, jnp.full(k, 1.0 / k)


def random(x, k: int, key):
  idx = jax.random.choice(key, x.shape[0], (k,), replace=False)
  return idx.astype(jnp.int32), jnp.full(k, 1.0 / k)


def select(x, k: int, selector: str, key=None):
  """(anchors [K, E], weights [K]) from elements x [N, E]. K and the selector are static."""
  n = x.shape[0]
  if selector == "all":
    return x, jnp.full(n, 1.0 / n)
  if not 1 <= k <= n:
    raise ValueError(f"ADR: K={k} anchors requested but the context has only {n} frame "
                     f"elements; use 1 <= K <= {n} (or the 'all' selector).")
  if selector == "herding":
    idx, w = herding(x, k)
  elif selector == "kcenter":
    idx, w = kcenter(x, k)
  elif selector == "kmeanspp":
    idx, w = kmeanspp(x, k, key if key is not None else jax.random.key(0))
  elif selector == "uniform":
    idx, w = uniform(x, k)
  elif selector == "random":
    idx, w = random(x, k, key if key is not None else jax.random.key(0))
  else:
    raise ValueError(f"unknown ADR selector {selector!r}; known: {SELECTORS}")
  return x[idx], w


def mmd2(anchors, weights, x, bw=None):
  """Squared MMD between the weighted anchors and the uniform distribution over x."""
  bw = median_bandwidth(x) if bw is None else bw
  w = weights / jnp.maximum(weights.sum(), 1e-12)
  u = jnp.full(x.shape[0], 1.0 / x.shape[0])
  return (w @ rbf(anchors, anchors, bw) @ w - 2.0 * w @ rbf(anchors, x, bw) @ u
          + u @ rbf(x, x, bw) @ u)
