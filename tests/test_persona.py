"""Persona and DUET (adapt/persona.py): replacement edits, k-means, the dynamic refinement, the
networks' zero points, the evaluator's time-ordered stream, no device backward pass, bad
configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_refused_before_any_work, random_features

from mmpg_jax import tasks
from mmpg_jax.adapt import baselines
from mmpg_jax.adapt.persona import networks, prototypes, rows, stages
from mmpg_jax.core import kmeans as kmeans_lib
from mmpg_jax.core import params as P
from mmpg_jax.ondevice import costs
from mmpg_jax.training import evaluate
from mmpg_jax.training.methods import MethodContext


@pytest.fixture(scope="module")
def setup():
  import digits_persona
  cfg = digits_persona.get_config("smoke")
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, 0)
  ctx = MethodContext(task=task, model=model, params=params,
                                cost_model=costs.CostModel(task, model, params), config=cfg,
                                source_prior=None, val=None, workdir="", metrics=None)
  layers = networks.adaptive_layers(params, cfg.persona.layers)
  pc = cfg.persona
  fam = stages.Family(ctx, layers, networks.Generator(layers.shapes, pc.hidden, pc.code_dim),
                       networks.Editor(layers.shapes, pc.hidden, pc.code_dim), ())
  return cfg, task, model, params, fam


def _dev(task, model, params, cfg, seed=0, window=0, device_id=None):
  ctx, _ = random_features(task, model, params, cfg.data.context_size, seed)
  query, rng = random_features(task, model, params, 6, seed + 100)
  query["label"] = jnp.asarray(rng.integers(0, 10, 6), jnp.int32)
  return {"context": ctx, "query": query,
          "device_id": jnp.int32(seed if device_id is None else device_id),
          "window": jnp.int32(window)}


def _el(task, dev):
  return task.anchor_elements(dev["context"])["image"]


def test_replace_mode_sets_the_leaf_and_leaves_the_rest(setup):
  _, _, _, params, fam = setup
  new = jnp.full((fam.layers.shapes[1][1],), 0.25)
  out = P.apply_edit(params, {"classifier": {"out": {"bias": new}}}, mode="replace")
  np.testing.assert_array_equal(out["classifier"]["out"]["bias"], new)
  assert out["encoder"] is params["encoder"] or jax.tree.all(jax.tree.map(
      lambda a, b: bool((a == b).all()), out["encoder"], params["encoder"]))
  with pytest.raises(ValueError, match="mode must be"):
    P.apply_edit(params, {}, mode="multiply")


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
  rng = np.random.default_rng(0)
  truth = np.repeat(np.arange(4), 50)
  x = jnp.asarray(rng.normal(0, 0.1, (200, 3)) + 5.0 * np.eye(4, 3)[truth] * (1 + truth[:, None]))
  c1, a1 = kmeans_lib.kmeans(x, 4, 20, jax.random.key(0))
  c2, a2 = kmeans_lib.kmeans(x, 4, 20, jax.random.key(0))
  np.testing.assert_array_equal(a1, a2)
  a1 = np.asarray(a1)
  for t in range(4):            # every true cluster maps to one k-means cluster, and back
    assert len(set(a1[truth == t])) == 1
  assert len(set(a1)) == 4


def _numpy_lloyd(x, c, iterations):
  """Plain numpy Lloyd iterations (the reference)."""
  x, c = np.asarray(x, np.float64), np.asarray(c, np.float64).copy()
  for _ in range(iterations):
    a = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    for g in range(len(c)):
      if (a == g).any():
        c[g] = x[a == g].mean(0)
  return c, ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)


def test_jax_kmeans_equals_a_numpy_reference_on_a_fixed_seed():
  x = jax.random.normal(jax.random.key(7), (300, 5))
  key = jax.random.key(3)
  centres, assign = kmeans_lib.kmeans(x, 6, 25, key)
  init = kmeans_lib.kmeanspp(x, 6, key)
  # the seeds are data points, each drawn once
  rows = [int(np.flatnonzero((np.asarray(x) == np.asarray(c)).all(1))[0]) for c in init]
  assert len(set(rows)) == 6
  want_c, want_a = _numpy_lloyd(x, init, 25)
  np.testing.assert_array_equal(np.asarray(assign), want_a)
  np.testing.assert_allclose(np.asarray(centres), want_c, rtol=1e-5, atol=1e-5)


def test_refine_moves_assigned_centres_by_the_rate_and_merges_close_pairs():
  centres = jnp.asarray([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  state = {"centres": centres, "population": jnp.full(3, 1 / 3), "merges": jnp.int32(0)}
  codes = jnp.asarray([[2.0, 0.0], [2.0, 2.0]])
  out = prototypes.refine(state, codes, jnp.asarray([0, 0]), 0.5, merge_distance=0.1)
  np.testing.assert_allclose(out["centres"][0], [1.0, 0.5])       # half-way to their mean
  np.testing.assert_array_equal(out["centres"][1:], centres[1:])   # nobody assigned: unmoved
  np.testing.assert_allclose(out["population"].sum(), 1.0, rtol=1e-6)
  assert int(out["merges"]) == 0
  # two centres closer than the merge distance: merged; the freed slot splits the most
  # spread-out prototype half-way towards its farthest window; K stays 3
  close = {"centres": jnp.asarray([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0]]),
           "population": jnp.asarray([0.25, 0.25, 0.5]), "merges": jnp.int32(0)}
  codes = jnp.asarray([[5.0, 5.0], [9.0, 5.0], [0.0, 0.0]])
  out = prototypes.refine(close, codes, jnp.asarray([2, 2, 0]), 0.0, merge_distance=1.0)
  assert int(out["merges"]) == 1 and out["centres"].shape == (3, 2)
  np.testing.assert_allclose(out["centres"][0], [0.1, 0.0], atol=1e-6)   # the merged pair
  np.testing.assert_allclose(out["centres"][1], [7.0, 5.0], atol=1e-6)   # the split
  np.testing.assert_allclose(out["population"].sum(), 1.0, rtol=1e-6)


def test_refine_never_merges_without_a_split_and_never_averages_to_the_origin():
  two = {"centres": jnp.asarray([[0.0, 0.0], [0.01, 0.0]]), "population": jnp.zeros(2),
         "merges": jnp.int32(0)}
  out = prototypes.refine(two, jnp.asarray([[1.0, 1.0], [2.0, 2.0]]), jnp.asarray([0, 0]), 0.0,
                       merge_distance=1.0)
  assert int(out["merges"]) == 0           # K = 2: merging would leave nothing to split into
  three = {"centres": jnp.asarray([[1.0, 1.0], [1.01, 1.0], [5.0, 5.0]]),
           "population": jnp.asarray([0.0, 0.0, 1.0]), "merges": jnp.int32(0)}
  out = prototypes.refine(three, jnp.asarray([[5.0, 5.0], [9.0, 5.0]]), jnp.asarray([2, 2]), 0.0,
                       merge_distance=1.0)
  assert int(out["merges"]) == 1
  np.testing.assert_allclose(out["centres"][0], [1.005, 1.0], atol=1e-6)   # midpoint, not 0
  # a split that would land within the merge distance of its source is not made
  out = prototypes.refine(three, jnp.asarray([[5.0, 5.0], [5.5, 5.0]]), jnp.asarray([2, 2]), 0.0,
                       merge_distance=1.0)
  assert int(out["merges"]) == 0


def test_zero_heads_give_the_global_model_and_duet_starts_at_it(setup):
  cfg, task, model, params, fam = setup
  dev = _dev(task, model, params, cfg)
  ed = fam.editor.init(jax.random.key(0), _el(task, dev))["params"]
  zero = dict(ed, heads=jax.tree.map(jnp.zeros_like, ed["heads"]))
  got = fam.single_params(zero, dev)
  jax.tree.map(np.testing.assert_array_equal, got, params)
  gen = fam.generator.init(jax.random.key(0), _el(task, dev))["params"]
  flat = P.flatten(params)
  heads = jax.tree.map(jnp.zeros_like, gen["heads"])
  for n, path in enumerate(fam.layers.paths):
    heads[f"a_{n}"] = flat[f"{path}/kernel"].reshape(-1)
    heads[f"b_{n}"] = flat[f"{path}/bias"]
  got = fam.duet_params(dict(gen, heads=heads), dev)
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_layer_codes_carry_knowledge_across_layers(setup):
  cfg, task, model, params, fam = setup
  dev = _dev(task, model, params, cfg)
  ed = fam.editor.init(jax.random.key(1), _el(task, dev))["params"]
  e = fam.editor.apply({"params": ed}, _el(task, dev), method=networks.Editor.codes)
  assert e.shape == (len(fam.layers.paths), cfg.persona.code_dim)
  # With both layers' projections made identical, the codes still differ: layer 1's code
  # reads the GRU state that layer 0's step left (h1 = GRU(h0, c0)), not c0 afresh.
  same = dict(ed, layer_out_1=ed["layer_out_0"])
  e2 = fam.editor.apply({"params": same}, _el(task, dev), method=networks.Editor.codes)
  np.testing.assert_allclose(e2[0], e[0])
  assert not np.allclose(e2[1], e2[0], atol=1e-4)


def _zero_heads(tree):
  return dict(tree, heads=jax.tree.map(jnp.zeros_like, tree["heads"]))


def test_a_zero_sample_edit_on_a_zero_prototype_edit_is_the_base_model(setup):
  cfg, task, model, params, fam = setup
  dev = _dev(task, model, params, cfg)
  ed = _zero_heads(fam.editor.init(jax.random.key(0), _el(task, dev))["params"])
  groups = jax.tree.map(lambda x: jnp.stack([x, x]), ed)
  centres = jax.random.normal(jax.random.key(1), (2, len(fam.layers.paths) * cfg.persona.code_dim))
  for g in range(2):
    jax.tree.map(np.testing.assert_array_equal,
                 fam.group_params(ed, groups, centres, g, dev), params)


def test_a_gradient_reaches_every_generator_and_editor_head(setup):
  cfg, task, model, params, fam = setup
  dev = _dev(task, model, params, cfg)
  el = _el(task, dev)
  gen = fam.generator.init(jax.random.key(0), el)["params"]
  ed = fam.editor.init(jax.random.key(1), el)["params"]
  loss = lambda p: task.meta_loss(model, p, dev["query"])[0]
  checks = {
      "duet": (gen, lambda g: loss(fam.duet_params(g, dev))),
      "persona_single": (ed, lambda e: loss(fam.single_params(e, dev))),
  }
  groups = jax.tree.map(lambda x: jnp.stack([x, x]), ed)
  centres = 0.5 * jnp.ones((2, len(fam.layers.paths) * cfg.persona.code_dim))
  checks["prototype editor 1"] = (
      groups, lambda gs: loss(fam.group_params(ed, gs, centres, 1, dev)))
  for name, (tree, fn) in checks.items():
    grads = jax.grad(fn)(tree)
    heads = P.flatten(grads["heads"])
    assert heads, name
    for path, g in heads.items():
      g = np.asarray(g)[1] if name.startswith("prototype") else np.asarray(g)
      assert np.abs(g).max() > 0, (name, path)
  # ... and the heads of the prototype edit are the Stage-A editor's (frozen in Stage C)
  grads = jax.grad(lambda e: loss(fam.group_params(e, groups, centres, 0, dev)))(ed)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in P.flatten(grads["heads"]).values())


def test_assignment_picks_the_minimal_edit_or_the_nearest_prototype(setup):
  cfg, task, model, params, fam = setup
  dev = _dev(task, model, params, cfg)
  ed = fam.editor.init(jax.random.key(2), _el(task, dev))["params"]
  scale = jnp.asarray([3.0, 0.5, 1.0])    # editor 1 needs the smallest sample edit
  groups = jax.tree.map(lambda x: jnp.stack([x, x, x]), ed)
  groups = dict(groups, heads=jax.tree.map(
      lambda h: h * scale.reshape((3,) + (1,) * (h.ndim - 1)), groups["heads"]))
  code = fam.codes(ed, dev)
  centres = jnp.stack([code + 5.0, code + 0.1, code - 3.0])   # centre 1 is the nearest too
  g, c = fam.assign(ed, groups, centres, dev, "min_edit")
  assert int(g) == 1
  np.testing.assert_allclose(c, code)
  centres = jnp.stack([code + 5.0, code - 3.0, code + 0.1])   # now centre 2 is the nearest
  assert int(fam.assign(ed, groups, centres, dev, "nearest")[0]) == 2
  assert int(fam.assign(ed, groups, centres, dev, "min_edit")[0]) == 1


def _methods(setup, rate=0.5):
  cfg, task, model, params, fam = setup
  dev = _dev(task, model, params, cfg)
  el = _el(task, dev)
  gen = fam.generator.init(jax.random.key(2), el)["params"]
  ed = fam.editor.init(jax.random.key(3), el)["params"]
  k = max(cfg.persona.prototypes)
  keys = jax.random.split(jax.random.key(4), k)
  groups = jax.tree.map(lambda x: jnp.stack([x + 0.01 * jax.random.normal(kk, x.shape)
                                             for kk in keys]), ed)
  centres = jax.random.uniform(jax.random.key(5), (k, len(fam.layers.paths) * cfg.persona.code_dim),
                               minval=-1, maxval=1)
  proto = {"groups": groups, "centres": centres, "sizes": np.ones(k, int), "summary": {}}
  return rows.make_methods(fam, gen, ed, {k: proto}), dev


def test_device_path_of_duet_and_persona_runs_no_backward_pass(setup, no_backward):
  cfg, task, model, params, fam = setup
  methods, dev = _methods(setup)
  names = [m.name for m in methods]
  # the paper's min-edit assignment as a row of its own beside validation's choice
  assert names == ["duet", "persona_single", "persona", "persona_min_edit", "persona_dynamic"]
  assert {h["assignment"] for h in methods[3].grid} == {"min_edit"}
  down = [m.cost(m.grid[0]).downlink_bytes for m in methods]
  floats = fam.layers.floats() * 4
  assert down == [floats, floats, floats + 4, floats + 4, 2 * floats + 4]   # layers | id + residual
  for m in methods:
    c = m.cost(m.grid[0])
    assert c.device_backward_passes == 0 and c.labels_used_per_device == 0
    assert c.uplink_bytes > 0 and c.downlink_bytes >= fam.layers.floats() * 4
    for hp in m.grid:
      p = jax.jit(lambda d: m.adapt(params, d, hp))(dev)
      task.scores(model, p, dev["query"]).block_until_ready()
      if m.stream is not None:
        state = m.stream.init(hp, np.arange(1))
        p, rep = m.stream.adapt(params, dev, hp, state)
        assert rep["code"].shape == state["centres"].shape[1:]
  # positive control: on-device fine-tuning does run one
  from conftest import BackwardPassRan
  fta = baselines.finetune_method(
      MethodContext(task=task, model=model, params=params,
                              cost_model=costs.CostModel(task, model, params), config=cfg,
                              source_prior=None, val=None, workdir="", metrics=None),
      "fta", "query", 5, cfg.dynamic_leaves, "supervised", "sgd", ({"lr": 0.1, "steps": 1},),
      labelled=True)
  with pytest.raises(BackwardPassRan):
    fta.adapt(params, dev, fta.grid[0])


def test_the_evaluator_serves_streams_in_time_order_and_refines_between_windows(setup):
  cfg, task, model, params, fam = setup
  methods, _ = _methods(setup)
  dyn = methods[-1]
  devs = [_dev(task, model, params, cfg, seed=s, window=w) for s in range(3) for w in range(3)]
  feats = jax.tree.map(lambda *x: np.stack(x), *devs)
  ev = evaluate.Evaluator(task, model, device_chunk=4)
  hp = {"assignment": "nearest", "rate": 0.0, "scope": "population", "prototypes": max(cfg.persona.prototypes)}
  # rate 0: the state never moves, so the stream equals the stateless method entry by entry
  a = ev.per_device_metrics(dyn, params, feats, hp)
  b = ev.per_device_metrics(dataclass_replace(dyn, stream=None), params, feats, hp)
  np.testing.assert_array_equal(a["accuracy"], b["accuracy"])
  # with refinement, window 0 is served by the initial state (same as static) and the state
  # seen at window t is the one refined by windows < t: recompute it by hand
  hp = {"assignment": "nearest", "rate": 0.9, "scope": "population", "prototypes": max(cfg.persona.prototypes)}
  got = ev.per_device_metrics(dyn, params, feats, hp)
  state = dyn.stream.init(hp, np.arange(3))
  for w in range(3):
    idx = [i for i, d in enumerate(devs) if int(d["window"]) == w]
    outs = [dyn.stream.adapt(params, devs[i], hp, state) for i in idx]
    for i, (p, _) in zip(idx, outs):
      q = devs[i]["query"]
      want = task.metric_values(task.scores(model, p, q), q)["accuracy"]
      np.testing.assert_allclose(got["accuracy"][i], want, rtol=1e-6)
    reports = jax.tree.map(lambda *x: jnp.stack(x), *[r for _, r in outs])
    state = dyn.stream.refine(state, reports, hp)
  assert not np.allclose(state["centres"], dyn.stream.init(hp, np.arange(3))["centres"])


def test_device_scope_keeps_each_device_its_own_moving_copy_of_its_prototype(setup):
  cfg, task, model, params, fam = setup
  methods, _ = _methods(setup)
  dyn = methods[-1]
  hp = {"assignment": "nearest", "rate": 1.0, "scope": "device", "prototypes": max(cfg.persona.prototypes)}
  a0 = _dev(task, model, params, cfg, seed=0)
  a1 = _dev(task, model, params, cfg, seed=5, window=1, device_id=0)   # its next window
  b0 = _dev(task, model, params, cfg, seed=1)
  state = dyn.stream.init(hp, np.arange(2))
  outs = [dyn.stream.adapt(params, d, hp, state) for d in (a0, b0)]
  reps = jax.tree.map(lambda *x: jnp.stack(x), *[r for _, r in outs])
  state = dyn.stream.refine(state, reps, hp)
  np.testing.assert_array_equal(state["centres"], dyn.stream.init(hp, np.arange(2))["centres"])
  np.testing.assert_allclose(state["personal"][0], outs[0][1]["code"], atol=1e-6)  # rate 1
  assert state["owner"].tolist() == [int(outs[0][1]["assign"]), int(outs[1][1]["assign"])]
  # window 1 of device 0, still on the same prototype, decodes its own copy
  stay = dict(state, owner=state["owner"].at[0].set(
      dyn.stream.adapt(params, a1, hp, state)[1]["assign"]))     # still on the same prototype
  _, rep = dyn.stream.adapt(params, a1, hp, stay)
  np.testing.assert_allclose(rep["centre"], state["personal"][0])
  # another prototype: a fresh copy from that prototype's centre
  moved = dict(state, owner=state["owner"].at[0].set(-1))
  _, rep = dyn.stream.adapt(params, a1, hp, moved)
  np.testing.assert_allclose(rep["centre"], state["centres"][int(rep["assign"])])


def dataclass_replace(m, **kw):
  import dataclasses
  return dataclasses.replace(m, **kw)


@pytest.mark.parametrize("key,value,match", [
    ("persona.prototypes", (2, 100), "training windows"),
    ("persona.prototypes", (), "training windows"),
    ("persona.epsilon", 0.0, "must be > 0"),
    ("persona.layers", ("classifier/norm",), "not a Dense layer"),
    ("persona.assignment", ("closest",), "subset of"),
    ("persona.refine_rates", (), "at least one value"),
])
def test_bad_persona_configs_are_refused_before_any_work(setup, tmp_path, key, value, match):
  assert_refused_before_any_work(setup[0], key, value, match, tmp_path)


def test_history_centres_replay_device_scope_refinement_along_each_meta_stream():
  """Stage C's refined training centres equal a plain loop over each stream: window t is served
  its device's copy of its prototype's centre (a fresh copy when the prototype changes), which
  then moves towards the window's code."""
  rng = np.random.default_rng(0)
  k, c, w, n, rate = 3, 4, 3, 8, 0.4               # 8 windows: streams of 3, the last partial
  centres = rng.normal(size=(k, c)).astype(np.float32)
  codes = rng.normal(size=(n, c)).astype(np.float32)
  labels = np.array([0, 0, 1, 2, 2, 2, 1, 1], np.int32)
  want = np.zeros_like(codes)
  for start in range(0, n, w):
    owner, p = -1, None
    for i in range(start, min(start + w, n)):
      g = labels[i]
      want[i] = p if owner == g else centres[g]
      p, owner = want[i] + rate * (codes[i] - want[i]), g
  got = prototypes.history_centres(jnp.asarray(codes), jnp.asarray(labels), jnp.asarray(centres),
                                w, rate)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got)[[0, 3, 6]], centres[labels[[0, 3, 6]]])  # starts
