"""CDC-MMPG: ADR, FDA, the device-side round trip, batch generation and upload checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BackwardPassRan

from mmpg_jax import generate
from mmpg_jax.adapt import baselines, cdc_mmpg, cdc_mmpg_report
from mmpg_jax.core import params as P
from mmpg_jax.core import upload as upload_lib
from mmpg_jax.data import moving_digits as md
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import reference as reference_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.ondevice import adr, costs
from mmpg_jax.tasks import _video
from mmpg_jax.training.methods import MethodContext


@pytest.fixture(scope="module")
def fda_setup(smoke_config, task, model_and_params):
  model, params = model_and_params
  prior = np.full(md.NUM_ANSWERS, 1.0 / md.NUM_ANSWERS)
  fda = fda_lib.from_config(smoke_config, task, params, prior, task.anchor_dims(model, params))
  anchor_dim = 2 * smoke_config.model.embed_dim
  fresh = fda_lib.init(fda, jax.random.key(0))
  # A "trained" FDA: every parameter perturbed, so edits are non-zero everywhere.
  leaves, tdef = jax.tree.flatten(fresh)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  trained = jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])
  return model, params, fda, fresh, trained, anchor_dim


def _frames(cfg, n_videos, seed=0):
  return jax.random.normal(jax.random.key(seed), (n_videos, cfg.data.frames,
                                                  cfg.model.embed_dim))


def _query(task, model, params, cfg, n=5, seed=0):
  rng = np.random.default_rng(seed)
  d = cfg.data
  video = rng.integers(0, 255, (n, d.frames, d.size, d.size), dtype=np.uint8)
  question = rng.integers(1, 20, (n, d.question_len)).astype(np.int32)
  return task.encode(model, params, video, question)


def _upload(anchors, weights, summary=None):
  """One video-QA upload (anchors [K, E], weights [K]; a leading device axis allowed)."""
  return upload_lib.Upload({"video": anchors}, {"video": weights}, summary)


def _ctx(task, model, params, cfg, source_prior=None):
  return MethodContext(task=task, model=model, params=params,
                                 cost_model=costs.CostModel(task, model, params), config=cfg,
                                 source_prior=source_prior, val=None, workdir="", metrics=None)


def _cdc_methods(task, model, params, cfg, fda, fda_params, summary):
  """The cdc_mmpg methods (and ablations) for the given FDA params (no meta-training)."""
  ctx = _ctx(task, model, params, cfg, np.asarray(fda.source_prior))
  return cdc_mmpg.make_methods(ctx, fda, fda_params, summary)


# ---------- ADR -------------------------------------------------------------------------------

def test_frame_elements_carry_motion():
  frames = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) ** 2
  el = _video.frame_elements(frames)
  assert el.shape == (4, 4)
  np.testing.assert_allclose(el[0], jnp.concatenate([frames[0, 0], frames[0, 1] - frames[0, 0]]))


@pytest.mark.parametrize("n", [2, 3, 4, 17, 224])
def test_the_sort_free_median_equals_jnp_median_bit_for_bit(n):
  """ADR's bandwidth (median of pairwise distances, ties and zeros included) is unchanged."""
  x = jax.random.normal(jax.random.key(n), (6, n, 16)) * jnp.arange(1, 7)[:, None, None]
  x = x.at[:, 0].set(x[:, -1])                         # a duplicate element: zero distances
  rows, cols = np.triu_indices(n, k=1)
  d = jax.vmap(lambda e: adr._sq_dists(e, e)[rows, cols])(x)
  new = jax.jit(jax.vmap(adr.median_nonneg))(d)
  old = jax.jit(jax.vmap(jnp.median))(d)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
  odd = d[:, :-1] if d.shape[1] > 1 else d
  np.testing.assert_array_equal(np.asarray(jax.vmap(adr.median_nonneg)(odd)),
                                np.asarray(jax.vmap(jnp.median)(odd)))


def test_herding_beats_random_on_mmd_and_weights_are_masses():
  key = jax.random.key(0)
  centres = jax.random.normal(key, (5, 6)) * 4
  x = centres[jnp.arange(200) % 5] + 0.3 * jax.random.normal(jax.random.key(1), (200, 6))
  a_h, w_h = adr.select(x, 8, "herding")
  mmd_rand = np.mean([float(adr.mmd2(*adr.select(x, 8, "random", jax.random.key(s)), x))
                      for s in range(10)])
  assert float(adr.mmd2(a_h, w_h, x)) < mmd_rand
  for sel in adr.SELECTORS:
    a, w = adr.select(x, 8, sel, jax.random.key(2))
    assert np.isclose(float(w.sum()), 1.0, atol=1e-5) and (np.asarray(w) >= 0).all(), sel
  # vmap over devices, jit with K static
  xs = jnp.stack([x, x[::-1]])
  a, w = jax.jit(jax.vmap(lambda x: adr.select(x, 8, "herding")))(xs)
  assert a.shape == (2, 8, 6) and w.shape == (2, 8)


def test_k_larger_than_the_frames_available_is_refused():
  with pytest.raises(ValueError, match="K=30 anchors requested but the context has only 20"):
    adr.select(jnp.zeros((20, 4)), 30, "herding")
  with pytest.raises(ValueError, match="unknown ADR selector"):
    adr.select(jnp.zeros((20, 4)), 3, "median")


# ---------- FDA -------------------------------------------------------------------------------

def test_edit_structure_equals_the_dynamic_leaves(smoke_config, fda_setup):
  model, params, fda, _, trained, anchor_dim = fda_setup
  _, dynamic = P.split(params, smoke_config.dynamic_leaves)
  edit = fda_lib.generate(fda, trained, _upload(jnp.ones((3, anchor_dim)), jnp.ones(3) / 3))
  materialised = {p: P.materialize(d, P.flatten(dynamic)[p].shape)
                  for p, d in P.edit_leaves(edit).items()}
  assert jax.tree.structure(P.unflatten(materialised)) == jax.tree.structure(dynamic)
  for p, leaf in P.flatten(dynamic).items():
    assert materialised[p].shape == leaf.shape, p
  assert any(isinstance(d, P.LowRankDelta) for d in P.edit_leaves(edit).values())


def test_zero_initialised_fda_yields_the_global_model_exactly(smoke_config, task, fda_setup):
  model, params, fda, fresh, _, _ = fda_setup
  dev = {"context": {"frames": _frames(smoke_config, smoke_config.data.context_size)}}
  q = _query(task, model, params, smoke_config)
  adapted = round_trip.adapt_device(task, params, fda, fresh, dev, selector="herding", k=4,
                                  clip=3.0, key=jax.random.key(0))
  assert np.array_equal(np.asarray(task.scores(model, params, q)),
                        np.asarray(task.scores(model, adapted, q)))


def test_vmapped_generate_equals_a_loop_and_padding_is_exact(fda_setup):
  _, _, fda, _, trained, anchor_dim = fda_setup
  a = jax.random.normal(jax.random.key(3), (4, 5, anchor_dim))
  w = jax.nn.softmax(jax.random.normal(jax.random.key(4), (4, 5)))
  vm = jax.vmap(lambda a, w: fda_lib.generate(fda, trained, _upload(a, w)))(a, w)
  for i in range(4):
    one = fda_lib.generate(fda, trained, _upload(a[i], w[i]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x[i], y, rtol=1e-5, atol=1e-6), vm, one)
  # zero-weight padding anchors are ignored exactly
  pad_a = jnp.concatenate([a[0], 100 * jnp.ones((3, anchor_dim))])
  pad_w = jnp.concatenate([w[0], jnp.zeros(3)])
  padded = fda_lib.generate(fda, trained, _upload(pad_a, pad_w))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               padded, fda_lib.generate(fda, trained, _upload(a[0], w[0])))


# ---------- the device side: forward only, no labels ------------------------------------------

def _device(task, model, params, cfg, with_labels, seed=0):
  d = cfg.data
  ctx = _frames(cfg, d.context_size, seed)
  query = _query(task, model, params, cfg, seed=seed)
  dev = {"context": {"frames": ctx, "q": jnp.zeros((d.context_size, cfg.model.question_dim)),
                     "qtype": jnp.zeros(d.context_size, jnp.int32)},
         "query": dict(query), "device_id": jnp.int32(seed),
         "type_q": jax.random.normal(jax.random.key(9), (len(md.QUESTION_TYPES),
                                                         cfg.model.question_dim))}
  if with_labels is not None:
    dev["query"]["answer"] = jnp.full((5,), with_labels, jnp.int32)
  return dev


def test_device_path_runs_no_backward_pass_and_uses_no_labels(smoke_config, task, fda_setup,
                                                              no_backward):
  model, params, fda, _, trained, _ = fda_setup
  summary = round_trip.device_summary(task, model, smoke_config, fda.source_prior)
  assert summary is not None       # the device's forward-only EM summary is on the path too
  method = _cdc_methods(task, model, params, smoke_config, fda, trained, summary)[0]
  assert method.name == "cdc_mmpg"

  def device_path(dev):                       # ADR -> (cloud generate) -> merge -> inference
    return task.scores(model, method.adapt(params, dev, {}), dev["query"])

  jitted = jax.jit(device_path)
  no_labels = jitted(_device(task, model, params, smoke_config, with_labels=None))
  for poison in (0, 13):
    with_labels = jitted(_device(task, model, params, smoke_config, with_labels=poison))
    assert np.array_equal(np.asarray(no_labels), np.asarray(with_labels))
  # Positive control: the detector does catch on-device fine-tuning (FTA).
  fta = baselines.fta(_ctx(task, model, params, smoke_config), 1)
  dev = _device(task, model, params, smoke_config, with_labels=0)
  dev["support"] = dict(dev["query"])
  with pytest.raises(BackwardPassRan):
    jax.jit(lambda d: fta.adapt(params, d, {"lr": 0.1, "steps": 1}))(dev)


def test_cdc_costs_report_no_backward_no_labels_and_real_bytes(smoke_config, task, fda_setup):
  model, params, fda, _, trained, anchor_dim = fda_setup
  summary = round_trip.device_summary(task, model, smoke_config, fda.source_prior)
  assert summary is not None
  methods = {m.name: m for m in _cdc_methods(task, model, params, smoke_config, fda, trained,
                                             summary)}
  c = methods["cdc_mmpg"].cost({})
  assert c.device_backward_passes == 0 and c.labels_used_per_device == 0
  # K anchors of (embedding + temporal difference) and a weight each, + the 14-float summary
  assert c.uplink_bytes == (smoke_config.adr.k * (anchor_dim + 1) + md.NUM_ANSWERS) * 4
  edit = fda_lib.generate(fda, trained, _upload(jnp.ones((2, anchor_dim)), jnp.ones(2) / 2))
  assert c.downlink_bytes == 4 * sum(x.size for x in jax.tree.leaves(edit))
  all_frames = methods["cdc_mmpg_all_frames"].cost({})
  n_el = smoke_config.data.context_size * (smoke_config.data.frames - 1)
  assert all_frames.uplink_bytes == (n_el * (anchor_dim + 1) + md.NUM_ANSWERS) * 4


def test_default_config_edit_is_under_5_percent_of_the_model():
  import moving_digits_qa

  from mmpg_jax import tasks
  cfg = moving_digits_qa.get_config()
  task = tasks.build(cfg)
  model = task.build_model()
  params = jax.eval_shape(lambda: task.init_params(model, 0))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  fda = fda_lib.from_config(cfg, task, params, np.full(md.NUM_ANSWERS, 1 / 14),
                            task.anchor_dims(model, params))
  anchor_dim = 2 * cfg.model.embed_dim
  fp = jax.eval_shape(lambda: fda_lib.init(fda, jax.random.key(0)))
  edit = jax.eval_shape(lambda p: fda_lib.generate(fda, p, _upload(jnp.ones((4, anchor_dim)),
                                                                   jnp.ones(4) / 4)), fp)
  assert fda_lib.edit_bytes(edit, 4) <= 0.05 * P.tree_bytes(params)


# ---------- the cloud boundary: uploads, batch generation -------------------------------------

@pytest.mark.parametrize("anchors,weights,match", [
    (np.zeros((3, 5), np.float32), None, r"shape \(3, 5\); expected \[K, 32\]"),
    (np.zeros((3,), np.float32), None, r"shape \(3,\)"),
    (np.zeros((3, 32), np.int32), None, "dtype int32"),
    (np.zeros((0, 32), np.float32), None, "empty anchor set"),
    (np.full((3, 32), np.nan, np.float32), None, "NaN/Inf"),
    (np.array([[np.inf] * 32, [0] * 32], np.float32), None, r"NaN/Inf values \(anchor rows \[0\]"),
    (np.zeros((40, 32), np.float32), None, "at most 16"),
    (np.zeros((3, 32), np.float32), np.array([1.0, -1.0, 1.0]), "non-negative"),
    (np.zeros((3, 32), np.float32), np.ones(4), r"expected \[3\]"),
])
def test_bad_uploads_are_refused(anchors, weights, match):
  with pytest.raises(upload_lib.UploadError, match=match):
    upload_lib.validate_anchors(anchors, weights, 32, max_anchors=16)


def test_sharded_generation_on_1_and_8_accelerators_gives_the_same_edits(fda_setup):
  _, _, fda, _, trained, anchor_dim = fda_setup
  assert jax.device_count() == 8
  a = np.asarray(jax.random.normal(jax.random.key(5), (20, 4, anchor_dim)), np.float32)
  w = np.full((20, 4), 0.25, np.float32)
  assert fda.summary_dim == md.NUM_ANSWERS
  s = np.asarray(jax.random.normal(jax.random.key(6), (20, fda.summary_dim)), np.float32)
  one = generate.EditGenerator(fda, trained, device_batch=8,
                               mesh=generate.make_mesh(jax.devices()[:1]))(_upload(a, w, s))
  eight = generate.EditGenerator(fda, trained, device_batch=8)(_upload(a, w, s))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), one, eight)
  ref = fda_lib.generate(fda, trained, _upload(jnp.asarray(a[13]), jnp.asarray(w[13]),
                                               jnp.asarray(s[13])))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x[13], y, rtol=1e-5, atol=1e-6),
               eight, ref)
  with pytest.raises(upload_lib.UploadError, match="NaN/Inf"):
    bad = a.copy()
    bad[3, 1, 0] = np.nan
    generate.EditGenerator(fda, trained, device_batch=8)(_upload(bad, w, s))


@pytest.mark.parametrize("selector", ["herding", "herding_ny16", "herding_rp3"])
def test_herding_is_prefix_consistent(selector):
  # Meta-training precomputes one K_max herding order per device and takes its first k,
  # weighted as the device's selector weighs a k-anchor selection.
  x = jax.random.normal(jax.random.key(7), (60, 5))
  idx16 = adr.herding_order(x, 16, selector)
  for k in (1, 4, 9):
    a_k, w_k = adr.select(x, k, selector)
    np.testing.assert_array_equal(np.asarray(x[idx16[:k]]), np.asarray(a_k))
    w_prefix = adr.prefix_weights(x, idx16, k, selector)
    np.testing.assert_allclose(w_prefix[:k], w_k, atol=1e-6)
    assert float(jnp.abs(w_prefix[k:]).sum()) == 0.0


def test_nystrom_herding_approximates_herding_at_a_fraction_of_the_kernel():
  centres = jax.random.normal(jax.random.key(0), (5, 6)) * 4
  x = centres[jnp.arange(200) % 5] + 0.3 * jax.random.normal(jax.random.key(1), (200, 6))
  # with every element a landmark the Nystrom kernel is the RBF kernel itself
  y = jax.random.normal(jax.random.key(3), (40, 6))
  d = adr._sq_dists(y, y)
  exact = jnp.exp(-d / adr.median_nonneg(d.reshape(-1)))
  phi = adr.nystrom_features(y, 40, jitter=1e-6)
  np.testing.assert_allclose(phi @ phi.T, exact, atol=2e-3)
  # a context of identical elements (a singular landmark kernel) still gives finite anchors
  for same in (jnp.ones((224, 128)), jnp.concatenate([jnp.ones((200, 128)), y[:24, :1] *
                                                      jnp.ones((24, 128))])):
    assert np.isfinite(np.asarray(adr.nystrom_features(same, 32, jitter=0.0))).all()
    a, w = adr.select(same, 16, "herding_ny32")
    assert np.isfinite(np.asarray(w)).all() and np.isclose(float(w.sum()), 1.0)
  mmd = {s: float(adr.mmd2(*adr.select(x, 8, s), x)) for s in ("herding", "herding_ny32")}
  mmd_rand = np.mean([float(adr.mmd2(*adr.select(x, 8, "random", jax.random.key(s)), x))
                      for s in range(10)])
  assert mmd["herding_ny32"] < mmd_rand and mmd["herding_ny32"] < 2 * mmd["herding"] + 1e-3
  # its FLOPs: an N x m kernel, not N x N
  big = jax.random.normal(jax.random.key(2), (224, 128))
  flops = {s: costs.flops(lambda e: adr.select(e, 16, s), big) for s in ("herding",
                                                                         "herding_ny32")}
  assert flops["herding_ny32"] < flops["herding"] / 4
  for bad in ("herding_ny", "herding_rp0", "herding_nyx"):
    assert not adr.is_selector(bad)
    with pytest.raises(ValueError, match="with n >= 1"):
      adr.select(x, 4, bad)


def test_diagnosis_of_the_edit_code_distance_and_label_prior(smoke_config, task, bench,
                                                             model_and_params, fda_setup):
  """cdc_mmpg's per-device diagnosis: a zero edit has norm 0 and a perturbed FDA's does not;
  the code distance is finite and non-negative; prior errors are total variations in [0, 1];
  the device's true query label prior is a distribution within each label group."""
  model, params, fda, fresh, trained, _ = fda_setup
  val = task.encode_split(model, params, bench.devices("validation"))
  dev = jax.tree.map(lambda x: x[0], val)
  truth = task.query_label_prior(dev)
  for lo, hi in task.label_groups:
    np.testing.assert_allclose(float(truth[lo:hi].sum()), 1.0, rtol=1e-6)
  summary = round_trip.device_summary(task, model, smoke_config, np.asarray(fda.source_prior))
  ref = reference_lib.reference_set(task, model, params, fda, trained, smoke_config, summary)
  n_ref = min(smoke_config.fda.reference_devices, smoke_config.fda.meta_devices)
  assert ref["codes"].shape == (n_ref, fda.code_dim) and float(ref["spacing"]) >= 0
  # memorisation yardstick: a training device's own edit lies at distance 0 from the set, and
  # the applied vectors are the clipped, materialised edits
  assert [float(x) for x in reference_lib.edit_distance(ref, ref["applied"][1])] == [0.0, 0.0]
  one = jax.tree.map(lambda x: x[1], ref["edits"])
  merged = P.apply_edit(params, one, smoke_config.fda.clip)
  change = np.concatenate([np.ravel(P.flatten(merged)[p] - P.flatten(params)[p])
                           for p in sorted(P.edit_leaves(one))])
  np.testing.assert_allclose(ref["applied"][1], change, atol=1e-6)
  for fp, zero in ((fresh, True), (trained, False)):
    diag = {k: float(v) for k, v in jax.jit(cdc_mmpg.diagnostics(
        task, params, fda, fp, smoke_config, summary, ref))(dev).items()}
    assert set(diag) == {"edit_norm", "code_distance", "fda_prior_tv", "device_prior_tv",
                         "shift_tv", "edit_nn_distance", "edit_nn_spread"}
    assert np.isfinite(diag["edit_nn_distance"]) and diag["edit_nn_distance"] >= 0
    assert (diag["edit_norm"] == 0.0) == zero
    assert np.isfinite(diag["code_distance"]) and diag["code_distance"] >= 0
    for k in ("fda_prior_tv", "device_prior_tv", "shift_tv"):
      assert 0.0 <= diag[k] <= 1.0, (k, diag[k])


@pytest.mark.parametrize("has_prior", [True, False])
def test_diagnosis_table_has_as_many_columns_in_every_row(task, has_prior):
  """The report's diagnosis table, with the label-prior columns (QA) and without them
  (retrieval): its separator and every row have the header's number of columns, or markdown
  renders it as text."""
  rng = np.random.default_rng(0)
  sel = task.selection_metric.name
  per = lambda n: {k + s: list(rng.uniform(size=n)) for k in (sel,) for s in ("", "_ood")}
  cdc = per(5)
  for s in ("", "_ood"):
    for k in ("edit_norm", "code_distance") + (("fda_prior_tv", "device_prior_tv", "shift_tv")
                                               if has_prior else ()):
      cdc[k + s] = list(rng.uniform(size=5))
  results = {"methods": {"global": {"per_device": per(5)}, "fta_k5": {"per_device": per(5)},
                         "cdc_mmpg": {"per_device": cdc, "info": {"reference_devices": 8}}}}
  table = [l for l in cdc_mmpg_report.diagnosis_lines(results, task) if l.startswith("|")]
  assert len(table) == 4                                  # header, separator, test, test_ood
  assert len({l.count("|") for l in table}) == 1, table
  assert ("FDA prior TV" in table[0]) == has_prior


@pytest.mark.parametrize("key,value,match", [
    ("adr.ablations", ("random", "herding"), "other than the default selector"),
    ("adr.selector", "herding_nyx", "adr.selector/ablations"),
])
def test_bad_selector_configs_are_refused_before_any_work(smoke_config, key, value, match,
                                                          tmp_path):
  from conftest import assert_refused_before_any_work
  assert_refused_before_any_work(smoke_config, key, value, match, tmp_path)


def test_nystrom_herding_tables_of_several_anchor_modalities_compile_without_lapack():
  """Retrieval's two anchor modalities, herded with herding_ny32 in one compiled program, as
  the FDA's meta-pool tables are: finite, and no LAPACK call (the per-modality Cholesky custom
  calls of one such program once hung the XLA CPU runtime)."""
  import moving_digits_retrieval
  from mmpg_jax import tasks
  from conftest import random_features
  cfg = moving_digits_retrieval.get_config("smoke")
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, 0)
  feats, _ = random_features(task, model, params, 4 * cfg.data.context_size, 0)
  ctx = jax.tree.map(lambda x: x.reshape(4, cfg.data.context_size, *x.shape[1:]), feats)

  def tables(ctx):
    elements = jax.vmap(task.anchor_elements)(ctx)
    assert len(elements) >= 2
    idx = {m: jax.vmap(lambda e: adr.herding_order(e, 8, "herding_ny32"))(el)
           for m, el in elements.items()}
    return idx, {m: jax.vmap(lambda e, i: adr.prefix_weights(e, i, 8, "herding_ny32"))(
        el, idx[m]) for m, el in elements.items()}

  program = str(jax.make_jaxpr(tables)(ctx))                 # nested jaxprs included
  assert not any(p in program for p in ("cholesky", "triangular_solve", "lu[", "eigh"))
  idx, weights = jax.jit(tables)(ctx)
  for m in idx:
    assert np.isfinite(np.asarray(weights[m])).all()
    np.testing.assert_allclose(np.asarray(weights[m]).sum(-1), 1.0, rtol=1e-5)
