"""Nystrom herding's features with the landmark kernel's Cholesky factor unrolled in matmuls
(adr.cholesky_unrolled) against the LAPACK form they replace: the same features to float
rounding, the same anchors, and no LAPACK call in the traced program (so it batches under
vmap)."""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.ondevice import adr


def _lapack_features(x, m, jitter=1e-4):
  """The former form: phi = C L^-T with L L^T = W (LAPACK cholesky + triangular solve)."""
  lm = adr.landmarks(x.shape[0], min(m, x.shape[0]))
  d = adr._sq_dists(x, x[lm])
  c = jnp.exp(-d / jnp.maximum(adr.median_nonneg(d.reshape(-1)), 1e-6))
  chol = jnp.linalg.cholesky(c[lm] + jitter * jnp.eye(len(lm)))
  return jax.scipy.linalg.solve_triangular(chol, c.T, lower=True).T


def _sets(seed, n=8):
  """Element sets of different shapes: Gaussian, clustered, a random walk (video-like), low rank."""
  r = np.random.default_rng(seed)
  centres = 3 * r.standard_normal((n, 6, 64))
  low = r.standard_normal((n, 224, 4)) @ r.standard_normal((4, 64))
  return [r.standard_normal((n, 224, 64)),
          centres[:, r.integers(0, 6, 224)] + 0.3 * r.standard_normal((n, 224, 64)),
          np.cumsum(0.2 * r.standard_normal((n, 224, 64)), 1),
          low + 0.01 * r.standard_normal((n, 224, 64))]


def test_unrolled_cholesky_and_solve_match_lapack():
  r = np.random.default_rng(0)
  q, _ = np.linalg.qr(r.standard_normal((32, 32)))
  a = jnp.asarray((q * np.geomspace(1e-3, 1.0, 32)) @ q.T, jnp.float32)
  b = jnp.asarray(r.standard_normal((32, 50)), jnp.float32)
  chol = adr.cholesky_unrolled(a)
  np.testing.assert_allclose(chol, jnp.linalg.cholesky(a), atol=1e-5)
  np.testing.assert_allclose(adr.solve_lower_unrolled(chol, b),
                             jax.scipy.linalg.solve_triangular(chol, b, lower=True),
                             rtol=1e-4, atol=1e-4)
  assert np.isnan(np.asarray(adr.cholesky_unrolled(-a))).any()     # not PD: NaN, as LAPACK


def test_unrolled_features_give_the_lapack_features_and_anchors():
  new = jax.jit(jax.vmap(lambda x: adr.nystrom_features(x, 32)))
  old = jax.jit(jax.vmap(lambda x: _lapack_features(x, 32)))
  herd = jax.jit(jax.vmap(lambda p: adr._greedy_herding(p @ p.mean(0), lambda j: p @ p[j], 16)))
  for x in _sets(0):
    x = jnp.asarray(x, jnp.float32)
    phi, ref = new(x), old(x)
    np.testing.assert_allclose(phi, ref, atol=2e-3 * float(jnp.abs(ref).max()))
    np.testing.assert_array_equal(herd(phi), herd(ref))


def test_no_lapack_call_and_finite_on_degenerate_contexts():
  x = jnp.asarray(_sets(1, 2)[0][0], jnp.float32)
  program = str(jax.make_jaxpr(lambda x: adr.nystrom_features(x, 32))(x))   # nested included
  assert not any(p in program for p in ("cholesky", "triangular_solve", "lu[", "eigh"))
  # identical elements (a rank-1 landmark kernel), even without jitter: the kernel columns
  for same in (jnp.ones((224, 64)), jnp.concatenate([jnp.ones((200, 64)), x[:24]])):
    for jitter in (0.0, 1e-4):
      assert np.isfinite(np.asarray(adr.nystrom_features(same, 32, jitter=jitter))).all()
