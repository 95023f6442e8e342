"""Deployment: encodings' error bounds, request policies' rates and replay, label-free rollback
of a planted harmful edit, the frontier, and the peak memory carried by FLOP counts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpg_jax import deploy
from mmpg_jax.core import codec
from mmpg_jax.deploy import policies as pol
from mmpg_jax.deploy import rollback as rb
from mmpg_jax.deploy import traffic
from mmpg_jax.ondevice import costs
from mmpg_jax.reporting import frontier as fr
from mmpg_jax.tasks import capabilities
from mmpg_jax.tasks.base import Metric, Task
from mmpg_jax.training import evaluate
from mmpg_jax.training.methods import Method


# ---- encodings ------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", codec.ENCODINGS)
def test_quantise_dequantise_stays_within_its_bound(encoding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 33)) * np.exp(rng.normal(size=(40, 1)) * 2)   # rows of many scales
  x[3] = 0.0                                                              # an unedited row
  x[5, 7] = 50.0                                                          # an outlier
  for arr in (x, x[0], x.reshape(8, 5, 33)):
    arr = jnp.asarray(arr, jnp.float32)
    err = np.abs(np.asarray(codec.roundtrip(arr, encoding)) - np.asarray(arr))
    assert (err <= np.asarray(codec.max_error(arr, encoding)) + 1e-12).all()
  np.testing.assert_array_equal(np.asarray(codec.roundtrip(jnp.asarray(x), encoding))[3], 0.0)
  ids = jnp.arange(5)
  assert codec.roundtrip(ids, encoding) is ids or (codec.roundtrip(ids, encoding) == ids).all()


def test_integer_codes_use_their_whole_range_and_the_bound_is_tight():
  x = jnp.linspace(-1.0, 1.0, 1001)[None]
  for enc, q in (("int8", 127), ("int4", 7)):
    err = np.abs(np.asarray(codec.roundtrip(x, enc) - x))
    assert err.max() > 0.4 / q                    # not trivially far below the bound
    assert err.max() <= 1.0 / (2 * q) * 1.01
    assert len(np.unique(np.asarray(codec.roundtrip(x, enc)))) == 2 * q + 1


def test_encoded_bytes_count_codes_and_row_scales():
  assert codec.encoded_bytes(1000, 100, "float32") == 4000
  assert codec.encoded_bytes(1000, 100, "float16") == 2000
  assert codec.encoded_bytes(1000, 100, "int8") == 1000 + 10 * codec.SCALE_BYTES
  assert codec.encoded_bytes(1001, 100, "int4") == 501 + 11 * codec.SCALE_BYTES
  assert codec.encoded_bytes(0, 100, "int4") == 0
  with pytest.raises(ValueError, match="unknown encoding"):
    codec.roundtrip(jnp.ones(3), "int2")


# ---- request policies ------------------------------------------------------------------------
def constructed_streams(seed, n=600, w=6):
  """Streams whose request gain grows with the drift since the last request."""
  rng = np.random.default_rng(seed)
  drift = rng.uniform(0, 1, (n, w, w))
  cloud = rng.uniform(0, 1, (n, w))
  base = rng.uniform(0.4, 0.6, (n, w))
  # an edit requested at r helps by how far window r had drifted from the cloud (a label-free
  # feature the device sees), fading with its age
  edited = np.empty((n, w, w))
  for t in range(w):
    for r in range(w):
      edited[:, t, r] = base[:, t] + 0.3 * cloud[:, r] * 0.7 ** max(t - r, 0)
  valid = np.ones((n, w), bool)
  return {"base": base, "edited": edited, "drift": drift, "cloud": cloud, "valid": valid,
          "device": np.arange(n)}


@pytest.mark.parametrize("policy", ["every_k", "drift", "learned"])
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.5])
def test_a_policy_set_on_validation_streams_requests_at_its_budget(policy, budget):
  val, test = constructed_streams(0), constructed_streams(1)
  weights = pol.fit_learned(val)
  param = pol.calibrate(policy, budget, val, weights)
  _, asked = pol.replay(policy, param, test, weights)
  assert abs(pol.rate(asked, test["valid"]) - budget) <= 0.025, (policy, budget, param)


def test_always_and_never_and_what_a_device_keeps_between_requests():
  a = constructed_streams(0, n=5, w=4)
  assert pol.rate(pol.replay("always", None, a)[1], a["valid"]) == 1.0
  metric, asked = pol.replay("never", None, a)
  assert not asked.any()
  np.testing.assert_array_equal(metric, a["base"])
  # every_k with k = 2: a device asks on alternate windows and keeps that edit in between
  metric, asked = pol.replay("every_k", 2, a)
  assert (asked.sum(1) == 2).all()
  for d in range(5):
    t0 = int(np.flatnonzero(asked[d])[0])
    if t0 == 1:
      assert metric[d, 0] == a["base"][d, 0]
    for t in range(t0, 4):
      last = max(r for r in range(t + 1) if asked[d, r])
      assert metric[d, t] == a["edited"][d, t, last]


def test_the_learned_policy_keeps_more_of_the_gain_than_a_blind_schedule():
  val, test = constructed_streams(0), constructed_streams(1)
  weights = pol.fit_learned(val)
  never = pol.replay("never", None, test)[0].mean(1)
  always = pol.replay("always", None, test)[0].mean(1)
  kept = {}
  for policy in ("every_k", "learned"):
    m = pol.replay(policy, pol.calibrate(policy, 0.2, val, weights), test, weights)[0].mean(1)
    kept[policy] = pol.kept_share([(m, never, always)], n_boot=200)
    assert kept[policy][1] <= kept[policy][0] <= kept[policy][2]
  assert kept["learned"][0] > kept["every_k"][0] + 0.05, kept
  # two runs pooled: each run's mean weighs the same, whatever its number of devices
  share, lo, hi = pol.kept_share([(m, never, always), (m[:50], never[:50], always[:50])],
                                 n_boot=200)
  assert lo <= share <= hi and np.isfinite(share)
  assert np.isnan(pol.kept_share([(m, never, never)], n_boot=10)[0])    # no gain to keep


# ---- rollback ---------------------------------------------------------------------------------
class Linear(Task, capabilities.ScoredContext):
  """A softmax classifier on given features, with an entropy on its context: enough task for
  the evaluator and both rollback checks."""
  name = "linear"
  metrics = (Metric("accuracy"),)
  roles = ("context", "query")

  def __init__(self):
    pass

  def scores(self, model, params, feats):
    return feats["x"] @ params["w"]

  def metric_values(self, scores, feats):
    return {"accuracy": (scores.argmax(-1) == feats["label"]).mean()}

  def entropy(self, model, params, feats):
    lp = jax.nn.log_softmax(self.scores(model, params, feats))
    return -(jnp.exp(lp) * lp).sum(-1).mean()


def linear_devices(n, seed, classes=4, samples=16):
  rng = np.random.default_rng(seed)
  def role():
    y = rng.integers(0, classes, (n, samples))
    x = np.eye(classes)[y] * 3.0 + rng.normal(0, 0.3, (n, samples, classes))
    return {"x": x.astype(np.float32), "label": y}
  return {"context": role(), "query": role(), "device_id": np.arange(n, dtype=np.int32)}


def test_a_planted_harmful_edit_is_rolled_back_and_a_helpful_one_kept():
  task = Linear()
  params = {"w": jnp.eye(4) * 0.3}          # right but unsure: sharpening it helps no one
  harmful = lambda d: d["device_id"] % 3 == 0

  def adapt(p, dev, hp):
    # planted: a third of the devices get a shrunk, permuted classifier (wrong and unsure);
    # the others a sharpened copy of theirs (right and surer)
    bad = jnp.roll(p["w"], 1, axis=1) * 0.1
    return {"w": jnp.where(harmful(dev), bad, p["w"] * 3.0)}

  m = Method("planted", ({},), adapt, lambda hp: costs.DeviceCost(downlink_bytes=64.0),
             uses=("context",))
  ev = evaluate.Evaluator(task, None, device_chunk=8)
  val, test = linear_devices(30, 0), linear_devices(21, 1)
  out = deploy.rollback_study(ev, task, params, [m], {"planted": {"hp": {}}}, val,
                              {"test": test})["planted"]
  assert out["check"] in rb.checks(task) == ("entropy_rise", "disagreement")
  assert np.isfinite(out["threshold"])
  t = out["groups"]["test"]
  assert t["auroc"]["entropy_rise"] == 1.0 and t["auroc"]["disagreement"] == 1.0
  assert t["harmed_before"] == pytest.approx(7 / 21)
  assert t["harmed_after"] == 0.0 and t["precision"] == 1.0 and t["recall"] == 1.0
  assert t["rolled_back"] == pytest.approx(7 / 21)
  assert t["metric_after"] > t["metric_edited"]


def test_no_check_is_chosen_when_no_edit_hurts():
  s = {"entropy_rise": np.array([0.1, 0.5, 0.9]), "disagreement": np.array([0.0, 0.2, 0.1])}
  assert rb.choose(s, np.array([0.9, 0.9, 0.9]), np.array([0.5, 0.5, 0.5])) == (
      rb.NEVER, float("inf"))
  summary = rb.summary(s, np.array([0.9, 0.9, 0.9]), np.array([0.5, 0.5, 0.5]), rb.NEVER,
                       float("inf"))
  assert summary["rolled_back"] == 0.0 and summary["harmed_after"] == 0.0


# ---- traffic ----------------------------------------------------------------------------------
def test_float32_traffic_is_the_method_itself_and_an_int8_model_is_within_its_bound():
  task = Linear()
  task.context_role = "context"
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)}
  edit = lambda p, dev, hp: {"w": p["w"] + dev["context"]["x"].mean(0)[:, None] * 0.1}
  m = Method("m", ({},), edit, lambda hp: costs.DeviceCost(uplink_bytes=64.0,
                                                           downlink_bytes=64.0))
  dev = jax.tree.map(lambda x: x[0], linear_devices(1, 0))
  cost = m.cost({})
  same = traffic.encoded(m, task, "float32", False, cost).adapt(params, dev, {})
  np.testing.assert_array_equal(same["w"], edit(params, dev, {})["w"])
  on8 = traffic.encoded(m, task, "float32", True, cost).adapt(params, dev, {})
  bound = codec.max_error(params["w"], "int8")
  assert (np.abs(on8["w"] - edit(params, dev, {})["w"]) <= bound + 1e-6).all()
  assert traffic.request_bytes(cost, "float32", (4, 4), "float32") == {"uplink": 64.0,
                                                                       "downlink": 64.0}
  rows = [{"encoding": e, "int8_model": False, "bytes": b, "validation": v}
          for e, b, v in (("float32", 128, 0.800), ("float16", 64, 0.799),
                          ("int8", 36, 0.798), ("int4", 20, 0.790))]
  assert traffic.choose(rows, 0.003) == "int8"
  assert traffic.choose(rows, 0.0) == "float32"


# ---- the frontier and device memory ------------------------------------------------------------
def test_the_frontier_marks_exactly_the_undominated_points():
  pts = {"a": (0.0, 0.40), "b": (1.0, 0.50), "c": (2.0, 0.70), "c_twin": (2.0, 0.70),
         "d": (3.0, 0.60), "e": (3.0, 0.80), "f": (5.0, 0.80), "g": (float("nan"), 0.99)}
  on = {p["method"] for p in fr.frontier(pts) if p["pareto"]}
  assert on == {"a", "b", "c", "c_twin", "e"}
  # lower is better: the cheapest of the lowest wins
  on = {p["method"] for p in fr.frontier(pts, higher_is_better=False) if p["pareto"]}
  assert on == {"a"}


def test_flop_counts_carry_the_working_set_of_the_programs_they_sum():
  big = costs.flops(lambda x: jnp.tanh(x @ x) @ x, jnp.ones((256, 256)))
  small = costs.flops(lambda x: x.sum(), jnp.ones((4,)))
  assert big.working >= 256 * 256 * 4 and small.working < big.working
  total = small + 3 * big - small
  assert float(total) == pytest.approx(3 * float(big)) and total.working == big.working
  c = costs.DeviceCost(device_flops=small + big)
  assert c.as_dict()["device_peak_bytes"] == big.working
  c.device_flops += small                 # a family adding a piece after construction
  assert c.as_dict()["device_peak_bytes"] == big.working
  # the device's peak: its resident model + the larger of adaptation's and inference's sets
  assert c.with_device_memory(1000.0, 1e12).as_dict()["device_peak_bytes"] == 1000.0 + 1e12
  assert c.with_device_memory(1000.0, 0.0).as_dict()["device_peak_bytes"] == 1000.0 + big.working
  assert dataclasses.asdict(costs.DeviceCost())["device_peak_bytes"] == 0.0


@pytest.mark.parametrize("key,value,match", [
    ("deploy.encodings", ("float32", "int2"), "deploy.encodings"),
    ("deploy.encodings", ("int8",), "float32 among them"),
    ("deploy.budgets", (0.1, 1.5), "deploy.budgets"),
    ("deploy.curve", (-0.1,), "deploy.curve"),
    ("deploy.codec_tolerance", -0.01, "deploy.codec_tolerance"),
    ("deploy.windows_per_hour", 0.0, "deploy.windows_per_hour"),
])
def test_bad_deploy_configs_are_refused_before_any_work(smoke_config, key, value, match,
                                                        tmp_path):
  from conftest import assert_refused_before_any_work
  assert_refused_before_any_work(smoke_config, key, value, match, tmp_path)


def test_deploy_names_the_run_does_not_build_are_refused_before_the_evaluation():
  cfg = type("C", (), {})()
  m = Method("persona", ({},), lambda p, d, hp: p, lambda hp: costs.DeviceCost())
  stream = dataclasses.replace(m, name="persona_dynamic", stream=object())
  for methods, policy, match in (([m], "persnoa", "persnoa"),
                                 ([m, stream], "persona_dynamic", "stream method")):
    cfg.deploy = type("D", (), {"methods": ("persona",), "policy_method": policy})()
    with pytest.raises(ValueError, match=match):
      deploy.check_names(methods, cfg)
