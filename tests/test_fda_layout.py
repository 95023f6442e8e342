"""The FDA's stacked layout against its per-leaf layout: same starting parameters, same edits
(to float reassociation), one EM over all label groups equal to the group-by-group EM, and a
finished run written in the per-leaf layout loading converted."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpg_jax.core import checkpointing
from mmpg_jax.core import params as P
from mmpg_jax.core.upload import Upload
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import per_leaf
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.training import meta_train

SPEC = (("l1", (("l1/bias", (8,)), ("l1/kernel", (16, 8)))),
        ("l2", (("l2/scale", ()),)),
        ("l3", (("l3/bias", (5,)), ("l3/kernel", (40, 5)))))
SMALL = dict(spec=SPEC, hidden=16, code_dim=16, num_queries=2, layer_dim=8, rank=2,
             full_delta_max=64, em_iterations=6)
FDAS = {
    "label groups, summary": fda_lib.FDA(
        modalities=(("video", 12),), label_groups=((0, 2), (2, 5)),
        source_prior=(0.1, 0.2, 0.3, 0.25, 0.15), prior_bias_leaf="l3/bias", summary_dim=5,
        **SMALL),
    "two modalities": fda_lib.FDA(modalities=(("video", 12), ("text", 6)), **SMALL),
}


def _uploads(fda, n=4, k=7, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.dirichlet(np.ones(k), n)
  w[:, -2:] = 0.0                                      # dead (padding) anchors
  return Upload({m: jnp.asarray(rng.normal(size=(n, k, d)), jnp.float32) for m, d in fda.modalities},
                {m: jnp.asarray(w, jnp.float32) for m, _ in fda.modalities},
                jnp.asarray(0.3 * rng.normal(size=(n, fda.summary_dim)), jnp.float32)
                if fda.summary_dim else None)


def _perturbed(tree, seed=1):
  leaves, tdef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tdef, [x + 0.1 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _close(a, b, tol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("which", list(FDAS))
def test_stacked_heads_give_the_per_leaf_heads_outputs(which):
  fda = FDAS[which]
  old = per_leaf.module(fda)
  old_params = old.init(jax.random.key(0), fda_lib.example_upload(fda))["params"]
  # the same starting parameters, bit for bit, and a fresh FDA's edit is exactly zero
  fresh = fda_lib.init(fda, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, fresh, per_leaf.stack(fda, old_params))
  assert fda.init(jax.random.key(3), fda_lib.example_upload(fda))["params"].keys() == fresh.keys()
  ups = _uploads(fda)
  zero = fda_lib.generate(fda, fresh, jax.tree.map(lambda x: x[0], ups))
  for d in P.edit_leaves(zero).values():
    assert not np.any(np.asarray(d.a @ d.b if isinstance(d, P.LowRankDelta) else d))
  # a trained (perturbed) FDA: the same edits and diagnostics in both layouts
  trained = _perturbed(old_params)
  want = jax.vmap(lambda u: old.apply({"params": trained}, u))(ups)
  got = jax.vmap(lambda u: fda.apply({"params": per_leaf.stack(fda, trained)}, u))(ups)
  assert np.abs(np.asarray(jax.tree.leaves(want[0])[0])).max() > 1e-3    # not a zero edit
  _close(got, want)


def test_one_masked_em_over_all_groups_equals_the_em_of_each_group():
  groups, k = ((0, 10), (10, 14), (14, 15)), 16
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(k, 15)) * 2, jnp.float32)
  weights = jnp.asarray(rng.dirichlet(np.ones(k)), jnp.float32).at[-3:].set(0.0)
  source = jnp.asarray(rng.dirichlet(np.ones(15)), jnp.float32)
  got = fda_lib.grouped_em(logits, weights, source, groups, 10)
  for lo, hi in groups:
    s = source[lo:hi] / source[lo:hi].sum()
    prior = per_leaf.weighted_em(jax.nn.softmax(logits[:, lo:hi], -1), weights, s, 10)
    np.testing.assert_allclose(got[lo:hi], jnp.log(prior) - jnp.log(s), rtol=1e-5, atol=1e-6)


def test_a_finished_run_in_the_per_leaf_layout_loads_converted(smoke_config, task,
                                                               model_and_params, tmp_path):
  model, params = model_and_params
  prior = np.full(14, 1.0 / 14)
  fda = fda_lib.from_config(smoke_config, task, params, prior, task.anchor_dims(model, params))
  old = per_leaf.module(fda)
  trained = _perturbed(old.init(jax.random.key(0), fda_lib.example_upload(fda))["params"])
  _, state = meta_train.selected_state(trained, smoke_config.fda)
  state = dict(state, best_params=trained)
  with checkpointing.StageCheckpointer(str(tmp_path), fda_stage.STAGE) as ck:
    ck.save(smoke_config.fda.num_steps, state, {})
  loaded = fda_stage.load_finished(fda, smoke_config, str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, loaded, per_leaf.stack(fda, trained))
  ups = _uploads(fda, k=smoke_config.adr.k)
  _close(jax.vmap(lambda u: fda.apply({"params": loaded}, u))(ups),
         jax.vmap(lambda u: old.apply({"params": trained}, u))(ups))
  # a checkpoint of neither layout of this FDA is still refused, naming the difference
  other = fda_lib.from_config(smoke_config.copy_and_resolve_references(), task, params, prior,
                              task.anchor_dims(model, params)).clone(rank=3)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="different shapes"):
    fda_stage.load_finished(other, smoke_config, str(tmp_path))


@pytest.mark.parametrize("which", list(FDAS))
def test_the_pieces_the_bench_times_compose_to_the_whole(which):
  """`bench --what=generate` times the FDA's methods one by one; chained they are generate."""
  fda = FDAS[which]
  fp = _perturbed(fda_lib.init(fda, jax.random.key(0)))
  up = jax.tree.map(lambda x: x[0], _uploads(fda))
  call = lambda method, *a: fda.apply({"params": fp}, *a, method=method)
  pooled, h = call(fda_lib.FDA.encode, up)
  ratio = (call(fda_lib.FDA.label_prior, h, up.weights["video"])[1] if fda.label_groups
           else None)
  summary = call(fda_lib.FDA.summary_of, up)
  z = call(fda_lib.FDA.domain_code, pooled, ratio, summary)
  outs = call(fda_lib.FDA.heads, call(fda_lib.FDA.layer_codes, z))
  edit = call(fda_lib.FDA.assemble, outs, ratio, summary)
  jax.tree.map(np.testing.assert_array_equal, edit, fda_lib.generate(fda, fp, up))
