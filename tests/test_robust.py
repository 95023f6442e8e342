"""CDC-MMPG's variants and controls (adapt/cdc_robust.py) and the forward-only rivals T3A and
LAME (adapt/tta.py): forward only on the device, exact fall-backs, and reference
implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BackwardPassRan, with_value
from test_cdc import _ctx, _device, fda_setup  # noqa: F401  (fda_setup is a fixture)

from mmpg_jax.adapt import cdc_mmpg, cdc_robust, tta
from mmpg_jax.adapt.cdc_robust import router
from mmpg_jax.core import config_errors
from mmpg_jax.core import params as P
from mmpg_jax.data import moving_digits as md
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import reference as reference_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.ondevice import costs
from mmpg_jax.training import config_checks

VARIANT_HP = {"cdc_mmpg_em2": {"scale": 1.0, "smoothing": 2.0},
              "cdc_mmpg_gate": {"temperature": 0.5},
              "cdc_mmpg_cloud_tent": {"lr": 1e-2, "steps": 0},
              "cdc_mmpg_wide": {}, "cdc_mmpg_wide_text": {},
              "cdc_mmpg_routed": {"sharpness": 2.0},
              "cdc_mmpg_routed_em2": {"sharpness": 2.0, "scale": 1.0, "smoothing": 2.0},
              "cdc_mmpg_ensemble": {},
              "cdc_mmpg_mean_edit": {}, "cdc_mmpg_nearest_edit": {},
              "cdc_mmpg_noisy_mean_edit": {"scale": 1.0},
              "t3a": {"filter_k": 2, "bias": "zero"}, "lame": {"knn": 3, "bound_lambda": 1.0},
              "foa": {"std_init": 0.1, "stat_weight": 1.0, "iterations": 2, "shift": 1.0}}


@pytest.fixture(scope="module")
def methods(smoke_config, task, fda_setup):  # noqa: F811
  """{'fresh' | 'trained': {name: Method}} for a zero-initialised and a perturbed FDA."""
  model, params, fda, fresh, trained, _ = fda_setup
  summary = round_trip.device_summary(task, model, smoke_config, fda.source_prior)
  cfg = with_value(smoke_config, "cdc_robust.variants",   # and the opt-in routed_em2, wide_text
                   smoke_config.cdc_robust.variants + ("routed_em2", "wide_text"))
  ctx = _ctx(task, model, params, cfg, np.asarray(fda.source_prior))
  ctx.val = jax.tree.map(lambda *x: jnp.stack(x), *[   # FOA's source statistics read these
      _device(task, model, params, smoke_config, with_labels=None, seed=s) for s in (1, 2)])
  # (`wide` is the same FDA trained on other data: here the same parameters; the router's
  # output bias is set so that it does not weigh the two experts equally)
  def other(fp):
    r = router.from_config(smoke_config, 2)
    rp = router.init(r, fda, (fp, fp), jax.random.key(0))
    biased = dict(rp, out=dict(rp["out"], bias=jnp.array([0.3, -0.3])))
    return {"wide": fp, "wide_text": fp, "routed": (r, biased)}
  return {label: {m.name: m for m in cdc_mmpg.make_methods(ctx, fda, fp, summary)
                  + cdc_robust.make_methods(ctx, fda, fp, summary, other(fp)) + tta.build(ctx)}
          for label, fp in (("fresh", fresh), ("trained", trained))}


def _scores(task, model, params, method, dev, hp):
  adapted = method.adapt(params, dev, hp)
  scores = task.scores(model, adapted, dev["query"])
  return scores if method.rescore is None else method.rescore(adapted, dev, hp, scores)


def test_every_variant_and_rival_runs_no_backward_pass_on_the_device(
    smoke_config, task, fda_setup, methods, no_backward):  # noqa: F811
  model, params, *_ = fda_setup
  dev = _device(task, model, params, smoke_config, with_labels=None)
  ms = methods["trained"]
  assert set(VARIANT_HP) <= set(ms), sorted(ms)
  for name, hp in VARIANT_HP.items():
    out = jax.jit(lambda d, m=ms[name], hp=hp: _scores(task, model, params, m, d, hp))(dev)
    assert np.all(np.isfinite(np.asarray(out))), name
    c = ms[name].cost(hp)
    assert c.device_backward_passes == 0 and c.labels_used_per_device == 0, name
  # Positive control: cloud-side refinement is where cloud_tent's backward passes are, and
  # the detector sees them; its device part (upload, merge) runs without.
  with pytest.raises(BackwardPassRan):
    jax.jit(lambda d: ms["cdc_mmpg_cloud_tent"].adapt(params, d, {"lr": 1e-2, "steps": 2}))(
        dev)


def test_a_zero_edit_reproduces_the_global_model_in_every_variant(smoke_config, task,
                                                                  fda_setup, methods):  # noqa: F811
  model, params, *_ = fda_setup
  dev = _device(task, model, params, smoke_config, with_labels=None)
  off = dict(VARIANT_HP, cdc_mmpg_em2={"scale": 0.0, "smoothing": 2.0},
             cdc_mmpg_routed_em2={"sharpness": 2.0, "scale": 0.0, "smoothing": 2.0})
  for name in [n for n in off if n.startswith("cdc_mmpg_")]:
    adapted = methods["fresh"][name].adapt(params, dev, off[name])
    for path, leaf in P.flatten(params).items():
      assert np.array_equal(np.asarray(leaf), np.asarray(P.flatten(adapted)[path])), (name,
                                                                                      path)


def test_cloud_refinement_with_zero_steps_is_the_plain_fda_edit(smoke_config, task, fda_setup,
                                                                methods):  # noqa: F811
  model, params, *_ = fda_setup
  dev = _device(task, model, params, smoke_config, with_labels=None)
  ms = methods["trained"]
  plain = P.flatten(ms["cdc_mmpg"].adapt(params, dev, {}))
  zero = P.flatten(ms["cdc_mmpg_cloud_tent"].adapt(params, dev, {"lr": 1e-2, "steps": 0}))
  assert all(np.array_equal(plain[p], zero[p]) for p in plain)
  refined = P.flatten(ms["cdc_mmpg_cloud_tent"].adapt(params, dev, {"lr": 1e-2, "steps": 3}))
  moved = {p for p in plain if not np.array_equal(plain[p], refined[p])}
  assert moved and moved <= set(P.select(params, smoke_config.cdc_robust.cloud_leaves))
  # The cloud's steps are counted as cloud FLOPs and ship the refined leaves; zero steps cost
  # what plain cdc_mmpg costs plus the uploaded samples.
  c0, c3 = (ms["cdc_mmpg_cloud_tent"].cost({"lr": 1e-2, "steps": s}) for s in (0, 3))
  base = ms["cdc_mmpg"].cost({})
  assert c0.cloud_flops == 0 and c3.cloud_flops > 0 and c0.downlink_bytes == base.downlink_bytes
  # its backpropagation on the cloud, through the device's uploaded samples, is counted apart
  m = smoke_config.cdc_robust.cloud_samples
  assert (c0.cloud_backward_passes, c3.cloud_backward_passes) == (0, 3 * m)
  assert c3.device_backward_passes == 0
  assert c3.downlink_bytes > base.downlink_bytes and c0.uplink_bytes > base.uplink_bytes


def test_routed_edit_is_the_router_weighted_sum_of_the_experts_edits(smoke_config, task,
                                                                     fda_setup, methods):  # noqa: F811
  model, params, fda, _, trained, _ = fda_setup
  dev = _device(task, model, params, smoke_config, with_labels=None)
  leaves, tdef = jax.tree.flatten(trained)        # a second expert, unlike the first
  keys = jax.random.split(jax.random.key(7), len(leaves))
  experts = (trained, jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape)
                                                 for x, k in zip(leaves, keys)]))
  r = router.from_config(smoke_config, 2)
  rp = router.init(r, fda, experts, jax.random.key(0))
  up = round_trip.default_upload(task, params, dev, smoke_config, None)
  assert np.allclose(router.generate(fda, experts, r, rp, up)[1]["weights"], 0.5)  # fresh: equal
  rp = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), rp)
  edit, aux = router.generate(fda, experts, r, rp, up)
  w = np.asarray(aux["weights"])
  assert abs(w.sum() - 1.0) < 1e-6 and abs(w[0] - w[1]) > 1e-3
  parts = [P.edit_leaves(fda.apply({"params": p}, up)[0]) for p in experts]
  shapes = {p: leaf.shape for p, leaf in P.flatten(params).items()}
  for path, d in P.edit_leaves(edit).items():
    want = sum(wi * P.materialize(e[path], shapes[path]) for wi, e in zip(w, parts))
    np.testing.assert_allclose(P.materialize(d, shapes[path]), want, rtol=1e-5, atol=1e-7)
  # Sharpness scales the router's logits: 0 weighs the experts equally, a large one picks
  # the expert the router prefers.
  w0 = router.generate(fda, experts, r, rp, up, 0.0)[1]["weights"]
  w_sharp = router.generate(fda, experts, r, rp, up, 1e4)[1]["weights"]
  assert np.allclose(w0, 0.5) and np.allclose(w_sharp, np.eye(2)[int(np.argmax(w))], atol=1e-6)
  # A router certain of the first expert reproduces plain cdc_mmpg's adapted model.
  sure = dict(rp, out=dict(rp["out"], kernel=0 * rp["out"]["kernel"],
                           bias=jnp.array([60.0, -60.0])))
  routed = P.apply_edit(params, router.generate(fda, experts, r, sure, up)[0],
                        smoke_config.fda.clip)
  plain = P.apply_edit(params, fda.apply({"params": experts[0]}, up)[0], smoke_config.fda.clip)
  for a, b in zip(jax.tree.leaves(routed), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The ensemble control weighs its experts equally: here both are the same FDA, so it is
  # plain cdc_mmpg whatever the (non-uniform) router of the fixture says.
  ms = methods["trained"]
  a = ms["cdc_mmpg_ensemble"].adapt(params, dev, {})
  b = ms["cdc_mmpg"].adapt(params, dev, {})
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # Costs: the downlink carries both experts' factors; the cloud runs both FDAs and the router.
  ms = methods["trained"]
  c, base = ms["cdc_mmpg_routed"].cost({"sharpness": 1.0}), ms["cdc_mmpg"].cost({})
  # (both experts' low-rank factors, one set of full deltas: more than one edit, under two)
  assert base.downlink_bytes < c.downlink_bytes < 2 * base.downlink_bytes and c.cloud_flops > 0
  assert c.uplink_bytes == base.uplink_bytes and c.device_backward_passes == 0
  # The cloud's extra work is about one more FDA forward pass on a device's K anchors.
  one = costs.flops(lambda p, u: fda.apply({"params": p}, u), experts[1],
                    fda_lib.example_upload(fda, smoke_config.adr.k))
  assert one <= c.cloud_flops <= 1.5 * one, (c.cloud_flops, one)


def test_controls_mean_edit_and_nearest_reference_device():
  # The nearest reference code, in units of the codes' spacing.
  ref = {"codes": jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0]]), "spacing": 2.0}
  d, i = reference_lib.code_distance(ref, jnp.array([9.0, 1.0]))
  assert int(i) == 1 and abs(float(d) - np.sqrt(2.0) / 2.0) < 1e-6
  # The mean edit averages each device's materialised, clipped delta.
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
  a, b, full = rng.normal(size=(5, 3, 2)), rng.normal(size=(5, 2, 4)), rng.normal(size=(5, 4))
  edits = {"w": P.LowRankDelta(jnp.asarray(a), jnp.asarray(b)), "b": jnp.asarray(full)}
  mean = cdc_robust.mean_applied_edit(edits, params, clip=0.5)
  np.testing.assert_allclose(mean["w"], np.clip(a @ b, -0.5, 0.5).mean(0), rtol=1e-5)
  np.testing.assert_allclose(mean["b"], np.clip(full, -0.5, 0.5).mean(0), rtol=1e-6)
  # Scaling an edit scales the delta it materialises.
  scaled = cdc_robust.scale_edit(edits, 0.25)
  np.testing.assert_allclose(P.materialize(jax.tree.map(lambda x: x[0], scaled["w"],
                                                        is_leaf=None), (3, 4)),
                             0.25 * a[0] @ b[0], rtol=1e-5)


def _t3a_reference(z, w, b, filter_k, groups=None, asked=None):
  """T3A as the official code writes it, in plain numpy loops; with `groups` each support is
  pseudo-labelled (and its entropy taken) within its group: a class's own, a sample's asked."""
  supports = np.concatenate([w.T, z])
  logits = supports @ w + b
  if groups is not None:
    of_class = np.concatenate([[g] * (hi - lo) for g, (lo, hi) in enumerate(groups)])
    group = np.concatenate([of_class, asked])
    for i in range(len(supports)):
      logits[i, of_class != group[i]] = -np.inf
  labels = logits.argmax(1)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
  out = np.zeros_like(w)
  for c in range(w.shape[1]):
    idx = sorted(np.flatnonzero(labels == c), key=lambda i: (ent[i], i))
    for i in idx[:filter_k] if filter_k else idx:
      out[:, c] += supports[i] / np.linalg.norm(supports[i])
  return out / np.maximum(np.linalg.norm(out, axis=0, keepdims=True), 1e-12)


@pytest.mark.parametrize("filter_k", [0, 1, 3])
def test_t3a_equals_a_plain_numpy_reference(filter_k):
  rng = np.random.default_rng(filter_k)
  z, w, b = rng.normal(size=(20, 6)), rng.normal(size=(6, 4)), rng.normal(size=4)
  got = tta.t3a_kernel(jnp.asarray(z), jnp.asarray(w), jnp.asarray(b), filter_k)
  np.testing.assert_allclose(got, _t3a_reference(z, w, b, filter_k), atol=1e-5)


@pytest.mark.parametrize("filter_k", [0, 2])
def test_t3a_pseudo_labels_within_the_asked_group(filter_k):
  """QA's shared vocabulary: a sample asked a digit question only joins digit prototypes."""
  rng = np.random.default_rng(10 + filter_k)
  groups = ((0, 4), (4, 6))
  z, w, b = rng.normal(size=(20, 6)), rng.normal(size=(6, 6)), rng.normal(size=6)
  asked = rng.integers(0, 2, 20)
  allowed = tta.group_mask(groups, jnp.asarray(asked), 6)
  got = tta.t3a_kernel(jnp.asarray(z), jnp.asarray(w), jnp.asarray(b), filter_k, allowed)
  np.testing.assert_allclose(got, _t3a_reference(z, w, b, filter_k, groups, asked), atol=1e-5)
  # ... and differs from pseudo-labelling over the whole vocabulary
  assert not np.allclose(got, _t3a_reference(z, w, b, filter_k), atol=1e-3)


def test_foa_activation_shift_is_the_shifted_last_layer_input(smoke_config, task, fda_setup):  # noqa: F811
  """FOA's back-to-source shift as a bias edit: the scores are those of the last layer's input
  moved by shift x (source mean - the device's context mean); the discrepancy is 0 at the
  source's own statistics and sums the layers."""
  model, params, *_ = fda_setup
  dev = _device(task, model, params, smoke_config, with_labels=None)
  context = dev["context"]
  layers = task.activation_layers(model, params, context)
  assert len(layers) == 2                     # QA: fusion output and head hidden layer
  source = [tta.feature_stats(a) for a in layers]
  assert float(tta.discrepancy(layers, source)) == 0.0
  mu_s = source[-1][0] + 0.3
  shifted = tta.activation_shift(task, model, params, context, (mu_s, None), 0.5)
  z = task.classifier_features(model, params, context)
  flat = P.flatten(params)
  kernel, bias = flat["answer_head/out/kernel"], flat["answer_head/out/bias"]
  want = (z + 0.5 * (mu_s - z.mean(0))) @ kernel + bias
  np.testing.assert_allclose(task.scores(model, shifted, context), want, atol=1e-4)


def test_lame_knn_affinity_and_its_fixed_point():
  rng = np.random.default_rng(0)
  # Two clusters of features; sample 0 sits in cluster A but its own prediction is unsure.
  feats = np.concatenate([rng.normal(size=(6, 4)) * 0.05 + [5, 0, 0, 0],
                          rng.normal(size=(6, 4)) * 0.05 + [0, 5, 0, 0]])
  w = tta.knn_affinity(jnp.asarray(feats), 3)
  assert np.all(np.asarray(w).sum(1) == 3) and np.all(np.diag(np.asarray(w)) == 0)
  assert np.asarray(w)[:6, 6:].sum() == 0            # neighbours stay in their cluster
  p = np.where(np.arange(12)[:, None] < 6, [0.9, 0.1], [0.1, 0.9])
  p[0] = [0.45, 0.55]
  log_y = tta.lame(jnp.log(jnp.asarray(p)), w, 1.0, 100)
  y = np.exp(np.asarray(log_y))
  assert y[0].argmax() == 0                          # pulled to its cluster's class
  np.testing.assert_allclose(y, np.asarray(tta.lame_step(jnp.log(p), w, y, 1.0)), atol=1e-5)
  # No affinity weight: LAME returns the model's own predictions.
  np.testing.assert_allclose(np.exp(np.asarray(tta.lame(jnp.log(p), w, 0.0, 5))), p,
                             atol=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("cdc_robust.variants", ("em2", "magic"), "known"),
    ("cdc_robust.cloud_samples", 10_000, "context samples"),
    ("cdc_robust.em2_scales", (-1.0,), ">= 0"),
    ("cdc_robust.cloud_steps", (1.5,), "integers"),
    ("cdc_robust.variants", ("routed",), "add 'wide'"),
    ("cdc_robust.variants", ("wide", "routed_em2"), "add 'routed'"),
    ("cdc_robust.variants", ("wide", "ensemble"), "add 'routed'"),
    ("cdc_robust.router_sharpness", (0.0,), "router_sharpness"),
    ("cdc_robust.router.meta_devices", 2, "the router's batch"),
    ("cdc_robust.router.num_steps", 0, "router.num_steps"),
    ("tta.lame.knn", (10_000,), "fewer than"),
    ("tta.t3a.filter_k", (-1,), "integers >= 0"),
])
def test_bad_variant_and_rival_configs_are_refused_before_any_work(smoke_config, key, value,
                                                                   match):
  with pytest.raises(config_errors.ConfigError, match=match):
    config_checks.check(with_value(smoke_config, key, value))


def test_wide_meta_shifts_never_draw_the_ood_only_ranges(smoke_config, task):
  # A single range draws exactly as rng.uniform (existing data unchanged); a union never
  # draws in its gap.
  a, b = np.random.default_rng(3), np.random.default_rng(3)
  assert [md.uniform(a, (0.0, 45.0)) for _ in range(5)] == [b.uniform(0.0, 45.0)
                                                            for _ in range(5)]
  rng = np.random.default_rng(0)
  x = np.array([md.uniform(rng, ((0.0, 1.0), (3.0, 4.0))) for _ in range(2000)])
  assert not np.any((x > 1.0) & (x < 3.0)) and 0.4 < np.mean(x > 3.0) < 0.6
  # `wide` by its stated rule: the named families' training ranges x the factor
  wide = task.with_data(cdc_robust.wide_data(smoke_config))
  assert wide.config.data.shift.clutter_alpha == ((0.0, 0.9),)
  assert np.isclose(wide.config.data.shift.invert_prob, 0.45)
  assert task.config.data.shift.clutter_alpha == (0.0, 0.6)      # the task is unchanged
  # the guard: no value only a held-out group shows, continuous or discrete, test OOD
  # (rotation, noise, clutter fragments) or validation OOD (stroke thickness)
  for bad in ({"shift": {"rotation": (0.0, 60.0)}}, {"shift": {"noise": ((0.0, 0.4),)}},
              {"shift": {"clutter_fragments": 4}}, {"shift": {"thickness": (-1, 0, 1, 2, 3)}},
              {"seed": 3}, {"shift": {"warp": (0.0, 1.0)}}):
    with pytest.raises(config_errors.ConfigError):
      task.with_data(bad)
  # the same rule over the held-out groups' families is refused, naming the group
  for families, group in ((("rotation",), "test_ood"), (("thickness",), "val_ood")):
    c = with_value(with_value(smoke_config, "cdc_robust.variants", ("wide",)),
                   "cdc_robust.wide_rule.families", families)
    with pytest.raises(config_errors.ConfigError, match=group):
      config_checks.check(c)


def test_wide_mix_draws_a_share_of_meta_devices_from_the_wide_ranges(smoke_config, task):
  c = with_value(smoke_config, "cdc_robust.variants", ("wide_mix",))
  overrides = cdc_robust.wide_overrides(c)["wide_mix"]
  cfg = lambda t: t.config.data.to_dict()
  rot = lambda t, i: float(md.device_shift(cfg(t), "meta", i)["rotation"])
  ids = range(40)
  none = task.with_data(dict(overrides, meta_wide=dict(overrides["meta_wide"], fraction=0.0)))
  assert [rot(none, i) for i in ids] == [rot(task, i) for i in ids]  # fraction 0: training's
  mixed = task.with_data(overrides)                                 # fraction 0.5
  # which meta devices draw from the wide ranges: their own RNG stream (nothing else moves)
  wide = [md._rng(cfg(mixed), "meta", i, md.META_MIX_CODE).random() < 0.5 for i in ids]
  assert 10 <= sum(wide) <= 30
  # a device drawn from training's ranges is exactly the training draw
  assert all(rot(mixed, i) == rot(task, i) for i, w in zip(ids, wide) if not w)
  for bad in ({"meta_wide": {"fraction": 0.5, "shift": {"rotation": (0.0, 60.0)}}},
              {"meta_wide": {"fraction": 1.5, "shift": {}}}):
    with pytest.raises(config_errors.ConfigError):
      task.with_data(bad)


def test_wide_text_meta_devices_change_only_their_captions_never_to_ood_words(smoke_config,
                                                                               task):
  c = with_value(smoke_config, "cdc_robust.variants", ("wide", "wide_text"))
  over = cdc_robust.wide_overrides(c)
  wide, text = (task.with_data(over[v]).config.data.to_dict() for v in ("wide", "wide_text"))
  roles = md.device_roles(wide, "meta")
  ood_only = {md._CAPTION_ID[w] for t in md.OOD_CAPTION_TEMPLATES for w in t.split()
              if not w.startswith("{")} - {md._CAPTION_ID[w] for t in md.CAPTION_TEMPLATES
                                          for w in t.split() if not w.startswith("{")}
  assert ood_only                                   # e.g. 'watch', 'travel', 'clip'
  unk, changed = md._CAPTION_ID[md.UNK], 0
  for i in range(6):
    a, b = md.make_cloud_device(wide, "meta", i, roles), md.make_cloud_device(text, "meta", i,
                                                                             roles)
    assert "caption_unk" not in md.device_shift(wide, "meta", i)   # wide's data is unchanged
    for role in roles:
      for k in ("video", "questions", "answers", "content"):
        np.testing.assert_array_equal(a[role][k], b[role][k])
      ca, cb = a[role]["caption"], b[role]["caption"]
      assert not set(np.unique(cb)) & ood_only
      # each caption keeps its length; its words are its own (in some order) or UNK
      np.testing.assert_array_equal((ca != 0).sum(1), (cb != 0).sum(1))
      for x, y in zip(ca, cb):
        assert set(y[y != 0]) - {unk} <= set(x[x != 0])
      changed += int(np.any(ca != cb))
  assert changed > 0
  # the content slots are never replaced; a shuffle permutes the words
  rng = np.random.default_rng(0)
  assert md.perturb_phrasing(rng, "a {t} {d} moving {m}", unk=1.0, shuffle=0.0) == (
      "<unk> {t} {d} <unk> {m}")
  shuffled = [md.perturb_phrasing(rng, "a {t} {d} moving {m}", 0.0, 1.0) for _ in range(5)]
  assert all(sorted(x.split()) == sorted("a {t} {d} moving {m}".split()) for x in shuffled)
  assert len(set(shuffled)) > 1
  for bad in ({"caption_noise": {"unk": (0.0, 1.5), "shuffle": (0.0, 1.0)}},
              {"caption_noise": {"unk": (0.0, 0.5)}}):
    with pytest.raises(config_errors.ConfigError, match="caption_noise"):
      task.with_data(bad)


def test_cma_es_search_finds_the_minimum_of_a_quadratic_with_forward_passes_only(no_backward):
  target = jnp.linspace(-0.5, 0.5, 6)
  x = jax.jit(lambda k: tta.cma_search(lambda x: jnp.sum(jnp.square(x - target)), 6, k,
                                       population=8, iterations=60, std_init=0.3))(
      jax.random.key(0))
  np.testing.assert_allclose(x, target, atol=0.02)
