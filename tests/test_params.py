import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpg_jax.core import params as P


def _tree():
  k = jax.random.split(jax.random.key(0), 3)
  return {"enc": {"kernel": jax.random.normal(k[0], (4, 3, 5)), "bias": jnp.zeros(5)},
          "head": {"kernel": jax.random.normal(k[1], (5, 7)), "bias": jnp.ones(7)}}


def test_select_split_merge_roundtrip():
  t = _tree()
  assert P.leaf_paths(t) == ["enc/bias", "enc/kernel", "head/bias", "head/kernel"]
  static, dynamic = P.split(t, ["head/.*"])
  assert P.leaf_paths(dynamic) == ["head/bias", "head/kernel"]
  assert P.leaf_paths(static) == ["enc/bias", "enc/kernel"]
  merged = P.merge(static, dynamic)
  jax.tree.map(np.testing.assert_array_equal, merged, t)


def test_regex_matching_nothing_is_an_error_listing_leaves():
  with pytest.raises(ValueError, match=r"'haed/\.\*' matches no parameter leaf(.|\n)*head/kernel"):
    P.select(_tree(), ["head/bias", "haed/.*"])


def test_invalid_regex_is_a_clear_error():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    P.select(_tree(), ["head/(kernel"])


def test_merge_refuses_overlap():
  t = _tree()
  with pytest.raises(ValueError, match="overlap"):
    P.merge(t, {"head": {"bias": jnp.zeros(7)}})


def test_zero_edit_is_exactly_the_base():
  t = _tree()
  _, dyn = P.split(t, ["head/.*", "enc/kernel"])
  edited = P.apply_edit(t, P.zeros_edit(dyn))
  for a, b in zip(jax.tree.leaves(edited), jax.tree.leaves(t)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_low_rank_edit_equals_its_materialised_form():
  t = _tree()
  k = jax.random.split(jax.random.key(1), 4)
  low = {"enc": {"kernel": P.LowRankDelta(jax.random.normal(k[0], (12, 2)),
                                          jax.random.normal(k[1], (2, 5)))},
         "head": {"kernel": P.LowRankDelta(jax.random.normal(k[2], (5, 3)),
                                           jax.random.normal(k[3], (3, 7)))}}
  full = {"enc": {"kernel": (low["enc"]["kernel"].a @ low["enc"]["kernel"].b).reshape(4, 3, 5)},
          "head": {"kernel": low["head"]["kernel"].a @ low["head"]["kernel"].b}}
  for clip in (None, 0.5):
    a, b = P.apply_edit(t, low, clip=clip), P.apply_edit(t, full, clip=clip)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)
  # and it is a real change, clipped where asked
  assert not np.allclose(P.apply_edit(t, full)["head"]["kernel"], t["head"]["kernel"])
  d = P.apply_edit(t, full, clip=0.5)["head"]["kernel"] - t["head"]["kernel"]
  assert float(jnp.abs(d).max()) <= 0.5 + 1e-6


def test_edit_errors_name_the_leaf():
  t = _tree()
  with pytest.raises(KeyError, match="head/weight"):
    P.apply_edit(t, {"head": {"weight": jnp.zeros((5, 7))}})
  with pytest.raises(ValueError, match="head/kernel.*shape"):
    P.apply_edit(t, {"head": {"kernel": jnp.zeros((7, 5))}})


def test_apply_edit_under_jit_and_bytes():
  t = _tree()
  f = jax.jit(lambda t, e: P.apply_edit(t, e, clip=1.0))
  out = f(t, {"head": {"bias": jnp.full(7, 3.0)}})
  np.testing.assert_allclose(out["head"]["bias"], 2.0)
  assert P.tree_bytes(t) == 4 * (60 + 5 + 35 + 7)
