"""ADR: the AnchorFrame Distribution Reasoner, on the device, forward-only.

From the anchor elements of the device's recent unlabelled data (the task's
`anchor_elements`: for video, frame embeddings with their temporal differences; caption codes),
pick K anchors whose (weighted) distribution stays close to all of them, so a few KB describe
what the device sees.

Selectors (all pure; jit- and vmap-able with K static):
  herding   greedy kernel herding: each step adds the element that most reduces the MMD between
            the anchors and all elements (RBF kernel, median-heuristic bandwidth).
  herding_ny<m>  herding (and Voronoi weights) on the Nystrom approximation of the kernel from
            m landmark elements spread over the context (e.g. herding_ny32): N x m kernel
            entries instead of N x N, which are most of herding's cost; the landmark kernel's
            Cholesky factor unrolled in matmuls (no LAPACK call: it batches under vmap).
  herding_rp<d>  herding on the elements mapped by a fixed random Gaussian projection to d
            dimensions: distances kept in expectation only (Johnson-Lindenstrauss).
  Both send the original elements as anchors.
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

# Every selector once (the sized herdings at one size each; any size is accepted).
SELECTORS = ("herding", "herding_ny32", "herding_rp8", "kcenter", "kmeanspp", "uniform",
             "random", "all")
_SIZED = {"herding_rp": "the projection's dimensions", "herding_ny": "the landmarks"}


def herding_size(selector: str):
  """(kind, d) of a sized herding selector (herding_rp<d>, herding_ny<m>), or None."""
  kind = next((s for s in _SIZED if selector.startswith(s)), None)
  if kind is None:
    return None
  d = selector[len(kind):]
  if not d.isdigit() or int(d) < 1:
    raise ValueError(f"ADR selector {selector!r}: write {kind}<n> with n >= 1 "
                     f"{_SIZED[kind]}, e.g. {kind}8")
  return kind, int(d)


def is_selector(selector: str) -> bool:
  try:
    return herding_size(selector) is not None or selector in SELECTORS
  except ValueError:
    return False


def random_projection(dim_in: int, dims: int):
  """A fixed Gaussian map from dim_in to dims dimensions, scaled so that squared distances
  are kept in expectation; a constant of the selector (the same on every device)."""
  rng = np.random.default_rng([dim_in, dims])
  return (rng.standard_normal((dim_in, dims)) / np.sqrt(dims)).astype(np.float32)


def _sq_dists(x, y):
  d = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2.0 * x @ y.T
  return jnp.maximum(d, 0.0)


def _kth_smallest_bits(bits, k: int):
  """The k-th smallest (0-based) of non-negative float32 values given as their int32 bit
  patterns (which order like the floats): a bisection over the 31 value bits, counting."""

  ones = jnp.ones(bits.shape[0], jnp.float32)

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    # counted by a dot (exact below 2^24): XLA's CPU reduce of a bool mask runs ~2x slower
    ok = (bits <= mid).astype(jnp.float32) @ ones >= k + 1
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


def _greedy_herding(mean_emb, column, k: int):
  """Greedy herding's choice of k elements from the kernel mean embedding [N] and
  `column(j)`, column j of the (exact or approximate) kernel matrix."""

  def body(t, carry):
    idx, taken, ksum = carry
    score = mean_emb - ksum / (t + 1.0)
    score = jnp.where(taken, -jnp.inf, score)
    j = jnp.argmax(score)
    return idx.at[t].set(j), taken.at[j].set(True), ksum + column(j)

  n = mean_emb.shape[0]
  idx, _, _ = jax.lax.fori_loop(0, k, body, (jnp.zeros(k, jnp.int32), jnp.zeros(n, bool),
                                             jnp.zeros(n)))
  return idx


def herding(x, k: int, k_active=None):
  """Greedy kernel herding. Returns (indices [k], weights [k]); with a traced `k_active` <= k
  only the first k_active anchors are chosen and weighted (the rest get weight 0)."""
  bw = median_bandwidth(x)
  kxx = rbf(x, x, bw)
  idx = _greedy_herding(kxx.mean(1), lambda j: kxx[:, j], k)
  active = jnp.arange(k) < (k if k_active is None else k_active)
  return idx, voronoi_mass(x, idx, active, bw) * active


def landmarks(n: int, m: int):
  """m element positions spread evenly over the context (its frames in time order)."""
  return np.floor((np.arange(m) + 0.5) * n / m).astype(np.int32)


def cholesky_unrolled(a):
  """The lower Cholesky factor of a small SPD matrix, column by column in plain matmuls
  (left-looking): no LAPACK call, so it batches under vmap (a per-device LAPACK Cholesky runs
  one small call at a time) and XLA counts its FLOPs. The same arithmetic as LAPACK's to float
  rounding; a matrix that is not positive definite gives NaN, as LAPACK's does."""
  n = a.shape[-1]
  rows = jnp.arange(n)
  chol = jnp.zeros_like(a)
  for j in range(n):
    col = a[:, j] - chol @ chol[j]
    chol = chol.at[:, j].set(jnp.where(rows >= j, col * jax.lax.rsqrt(col[j]), 0.0))
  return chol


def solve_lower_unrolled(chol, b):
  """x with chol x = b (chol lower triangular [n, n], b [n, m]), by forward substitution."""
  x = jnp.zeros_like(b)
  for i in range(chol.shape[-1]):
    x = x.at[i].set((b[i] - chol[i] @ x) / chol[i, i])
  return x


def nystrom_features(x, m: int, jitter: float = 1e-4):
  """phi [N, m] with phi phi^T = C W^-1 C^T, the Nystrom approximation of the RBF kernel
  matrix from m landmark elements (C = k(x, landmarks), W = k(landmarks, landmarks)); the
  bandwidth is the median squared distance of elements to landmarks. N m distances instead
  of N^2: the cost of herding drops by about N / m. phi = C L^-T with L L^T = W."""
  lm = landmarks(x.shape[0], min(m, x.shape[0]))
  d = _sq_dists(x, x[lm])                                      # [N, m]
  c = jnp.exp(-d / jnp.maximum(median_nonneg(d.reshape(-1)), 1e-6))
  chol = cholesky_unrolled(c[lm] + jitter * jnp.eye(len(lm)))
  phi = solve_lower_unrolled(chol, c.T).T
  # A landmark kernel too singular for float32 (many identical elements) fails the Cholesky
  # with NaN: fall back to the kernel columns themselves (a cruder, finite feature map).
  return jnp.where(jnp.isfinite(phi).all(), phi, c)


def nystrom_herding(x, k: int, m: int, k_active=None):
  """Herding (and Voronoi weights) on the Nystrom kernel of m landmarks: (indices, weights)."""
  phi = nystrom_features(x, m)
  idx = _greedy_herding(phi @ phi.mean(0), lambda j: phi @ phi[j], k)
  active = jnp.arange(k) < (k if k_active is None else k_active)
  sim = jnp.where(active[None, :], phi @ phi[idx].T, -jnp.inf)   # [N, K] kernel to anchors
  mass = jnp.zeros(k).at[sim.argmax(-1)].add(1.0) / x.shape[0]
  return idx, mass * active


def herding_kind(selector: str) -> str:
  """The herding a meta-training episode mimics for a device selector: the selector itself
  if it is a herding, else exact herding."""
  return selector if selector == "herding" or herding_size(selector) else "herding"


def herding_order(x, k: int, selector: str):
  """The first k elements a herding selector picks, in order. Greedy herding is
  prefix-consistent: the first k' of them are its k'-anchor selection."""
  sized = herding_size(selector)
  if sized and sized[0] == "herding_ny":
    return nystrom_herding(x, k, sized[1])[0]
  if sized and sized[1] < x.shape[-1]:
    x = x @ random_projection(x.shape[-1], sized[1])
  return herding(x, k)[0]


def prefix_weights(x, idx, k_active, selector: str):
  """The weights herding_order's first k_active anchors (a traced count) get from the
  selector: their Voronoi masses in its kernel; 0 for the rest."""
  active = jnp.arange(idx.shape[0]) < k_active
  sized = herding_size(selector)
  if sized and sized[0] == "herding_ny":
    phi = nystrom_features(x, sized[1])
    sim = jnp.where(active[None, :], phi @ phi[idx].T, -jnp.inf)
    return jnp.zeros(idx.shape[0]).at[sim.argmax(-1)].add(1.0) / x.shape[0] * active
  if sized and sized[1] < x.shape[-1]:
    x = x @ random_projection(x.shape[-1], sized[1])
  return voronoi_mass(x, idx, active) * active


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
  sized = herding_size(selector)
  if selector == "herding":
    idx, w = herding(x, k)
  elif sized and sized[0] == "herding_rp":
    d = sized[1]
    idx, w = herding(x if d >= x.shape[-1] else x @ random_projection(x.shape[-1], d), k)
  elif sized:
    idx, w = nystrom_herding(x, k, sized[1])
  elif selector == "kcenter":
    idx, w = kcenter(x, k)
  elif selector == "kmeanspp":
    idx, w = kmeanspp(x, k, key if key is not None else jax.random.key(0))
  elif selector == "uniform":
    idx, w = uniform(x, k)
  elif selector == "random":
    idx, w = random(x, k, key if key is not None else jax.random.key(0))
  else:
    raise ValueError(f"unknown ADR selector {selector!r}; known: {SELECTORS} (herding_ny<m>, "
                     f"herding_rp<d> at any size)")
  return x[idx], w


def mmd2(anchors, weights, x, bw=None):
  """Squared MMD between the weighted anchors and the uniform distribution over x."""
  bw = median_bandwidth(x) if bw is None else bw
  w = weights / jnp.maximum(weights.sum(), 1e-12)
  u = jnp.full(x.shape[0], 1.0 / x.shape[0])
  return (w @ rbf(anchors, anchors, bw) @ w - 2.0 * w @ rbf(anchors, x, bw) @ u
          + u @ rbf(x, x, bw) @ u)
