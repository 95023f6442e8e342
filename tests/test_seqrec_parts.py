"""The sequential-recommendation building blocks: metrics against references, and the SASRec /
GRU4Rec device models' padding semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmpg_jax.core import rec_metrics as rm
from mmpg_jax.models.seqrec import SeqRec


def test_auc_uauc_logloss_match_references():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(30, 20)).round(1)              # rounded: ties occur
  labels = (rng.random((30, 20)) < 0.2).astype(np.float32)
  labels[0] = 0                                            # a user with one class only
  labels[1] = 1
  m = rm.all_metrics(scores, labels)
  assert m["auc"] == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()), abs=1e-12)
  both = [u for u in range(30) if 0 < labels[u].sum() < 20]
  want = np.mean([roc_auc_score(labels[u], scores[u]) for u in both])
  assert m["uauc"] == pytest.approx(want, abs=1e-12)
  p = 1 / (1 + np.exp(-scores))
  assert m["logloss"] == pytest.approx(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)),
                                       rel=1e-9)


def test_ndcg_and_hr_on_one_positive_per_user_against_a_plain_loop():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(25, 100))                      # continuous: no ties
  labels = np.zeros((25, 100))
  labels[np.arange(25), rng.integers(0, 100, 25)] = 1
  r = rm.ranking(scores, labels)
  for u in range(25):
    rank = 1 + int(np.flatnonzero(np.argsort(-scores[u]) == labels[u].argmax())[0])
    for k in (5, 10, 20):
      assert r[f"hr@{k}"][u] == (rank <= k)
      assert r[f"ndcg@{k}"][u] == pytest.approx(1 / np.log2(rank + 1) if rank <= k else 0.0)


def test_a_nan_score_ranks_last_not_first():
  scores = np.random.default_rng(2).normal(size=(2, 100))
  scores[0, 0] = np.nan
  labels = np.zeros((2, 100))
  labels[:, 0] = 1
  r = rm.ranking(scores, labels)
  assert r["hr@20"][0] == 0 and r["ndcg@20"][0] == 0


def test_a_constant_scorer_gets_the_worst_rank_not_the_best():
  labels = np.zeros((3, 100))
  labels[:, 0] = 1                                         # the positive stored first
  r = rm.ranking(np.zeros((3, 100)), labels)
  assert r["hr@20"].sum() == 0 and r["ndcg@20"].sum() == 0
  assert rm.all_metrics(np.zeros((3, 100)), labels)["auc"] == 0.5


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_the_user_vector_ignores_padding_and_reads_the_last_real_click(backbone):
  model = SeqRec(num_items=50, backbone=backbone, dim=8, window=6, heads=2)
  w = jnp.array([[5, 7, 9, 0, 0, 0], [3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
  cand = jnp.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  params = model.init(jax.random.key(0), w, cand)["params"]
  assert set(params["classifier"]) == {"hidden", "out"}
  assert params["classifier"]["hidden"]["kernel"].shape == (8, 8)
  u = model.apply({"params": params}, w, method=model.encode_user)
  # perturbing the padding embedding (item 0) changes nothing: masked keys / unread GRU steps
  p2 = jax.tree.map(lambda x: x, params)
  p2["item_embed"]["embedding"] = p2["item_embed"]["embedding"].at[0].add(3.0)
  np.testing.assert_allclose(model.apply({"params": p2}, w[:2], method=model.encode_user),
                             u[:2], atol=1e-5)
  # the read position is the last real click: a longer prefix changes the vector
  u_short = model.apply({"params": params}, jnp.array([[5, 7, 0, 0, 0, 0]]),
                        method=model.encode_user)
  assert not np.allclose(u_short[0], u[0])
  s = model.apply({"params": params}, w, cand)
  assert s.shape == (3, 3) and np.isfinite(s).all()
  el = model.apply({"params": params}, w, method=model.window_elements)
  assert (el[0, 3:] == 0).all() and (el[2] == 0).all()


def test_the_official_unmasked_sasrec_lets_padding_in():
  model = SeqRec(num_items=50, dim=8, window=6, heads=2, attention_mask="none")
  w = jnp.array([[5, 7, 9, 0, 0, 0]])
  params = model.init(jax.random.key(0), w, jnp.array([[1, 2]]))["params"]
  u = model.apply({"params": params}, w, method=model.encode_user)
  p2 = jax.tree.map(lambda x: x, params)
  p2["item_embed"]["embedding"] = p2["item_embed"]["embedding"].at[0].add(3.0)
  assert not np.allclose(model.apply({"params": p2}, w, method=model.encode_user), u)


def test_the_official_duet_model_generates_its_classifier_from_the_window():
  """classifier_form='generated' (the released meta_sasrec): no classifier parameters; the two
  layers come from the window's GRU state through fixed heads that are not parameters (so no
  optimiser can train them), drawn as fmod(N(0, 1), 2) from a fixed key."""
  from mmpg_jax.models.seqrec import GeneratedClassifier
  model = SeqRec(num_items=50, dim=8, window=6, heads=2, classifier_form="generated")
  w = jnp.array([[5, 7, 9, 0, 0, 0], [5, 7, 9, 11, 0, 0]])
  cand = jnp.array([[1, 2, 3], [1, 2, 3]])
  params = model.init(jax.random.key(0), w, cand)["params"]
  assert "classifier" not in params and set(params["generator"]) == {"gru", "code_in",
                                                                   "code_out"}
  # every parameter gets a gradient (the generator trains end to end with the backbone)
  grads = jax.grad(lambda p: model.apply({"params": p}, w, cand).sum())(params)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["generator"]))
  # the user vector is the generated classifier's output: scores are plain dot products
  u = model.apply({"params": params}, w, method=model.encode_user)
  t = model.apply({"params": params}, cand, method=model.encode_items)
  np.testing.assert_allclose(model.apply({"params": params}, w, cand),
                             jnp.einsum("bd,bnd->bn", u, t), rtol=1e-5, atol=1e-5)
  # the heads are constants: the same code gives the same layers whatever the init seed
  gen = GeneratedClassifier(8)
  h = jax.random.normal(jax.random.key(1), (2, 6, 8))
  x = jax.random.normal(jax.random.key(2), (2, 8))
  g1 = gen.init(jax.random.key(3), x, h, jnp.array([2, 3]))["params"]
  out = gen.apply({"params": g1}, x, h, jnp.array([2, 3]))
  np.testing.assert_allclose(out, gen.apply({"params": g1}, x, h, jnp.array([2, 3])))
  assert jax.tree.structure(g1) == jax.tree.structure(
      gen.init(jax.random.key(4), x, h, jnp.array([2, 3]))["params"])
  # the read position matters: another last click, another classifier
  assert not np.allclose(out, gen.apply({"params": g1}, x, h, jnp.array([1, 3])))
