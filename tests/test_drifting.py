"""The drifting-digits image task: streams of windows, their drift, the builders,
one entry per (device, window), and the real main job on it at smoke size."""
import json

import jax
import numpy as np
import pytest
from conftest import assert_refused_before_any_work

from mmpg_jax import main, tasks
from mmpg_jax.data import drifting_digits as dd
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import pipeline
from mmpg_jax.reporting import aggregate
from mmpg_jax.tasks import image_classification as ic


@pytest.fixture(scope="module")
def cfg():
  import digits_persona
  return digits_persona.get_config("smoke")


@pytest.fixture(scope="module")
def gen(cfg):
  return ic.pipeline_cfg(cfg.data)


@pytest.fixture(scope="module")
def bench(cfg, data_dir):
  return pipeline.prepare(cfg.data, data_dir, builders=ic.Task.builders)


def test_reflect_keeps_a_walk_inside_its_range():
  for x in np.linspace(-7.0, 9.0, 101):
    y = dd._reflect(float(x), 1.0, 2.5)
    assert 1.0 <= y <= 2.5
  assert dd._reflect(1.7, 1.0, 2.5) == 1.7
  assert np.isclose(dd._reflect(2.7, 1.0, 2.5), 2.3) and np.isclose(dd._reflect(0.6, 1.0, 2.5), 1.4)


def test_a_device_is_deterministic_and_its_roles_are_independent(gen):
  a = dd.make_device(gen, "test", 1, {"context": 4, "query": 3})
  b = dd.make_device(gen, "test", 1, {"context": 4, "query": 5})
  c = dd.make_device(gen, "test", 1, {"context": 6, "query": 3})
  np.testing.assert_array_equal(a["context"]["image"], b["context"]["image"])
  np.testing.assert_array_equal(a["query"]["image"], c["query"]["image"])
  np.testing.assert_array_equal(a["query"]["label"], c["query"]["label"])
  assert "label" not in a["context"] and a["query"]["label"].shape == (3, 3)
  w = gen["drift"]["windows"]
  assert a["context"]["image"].shape == (w, 4, gen["size"], gen["size"])
  # windows are drawn afresh: no two windows share their images
  assert not np.array_equal(a["context"]["image"][0], a["context"]["image"][1])


def test_shifts_drift_stay_in_their_split_ranges_and_jump_at_the_configured_rate(gen):
  g = dict(gen, drift=dict(gen["drift"], windows=12))
  jumps, moves = [], []
  for split, ranges in (("test", g["shift"]), ("test_ood", g["ood_shift"])):
    for i in range(12):
      traj = dd.trajectory(g, split, i)
      for s in traj:
        rot = abs(float(s["rotation"]))
        lo, hi = ranges["rotation"]
        assert lo - 1e-4 <= rot <= hi + 1e-4, (split, rot)
        for key, rkey in (("noise", "noise"), ("blur", "blur"),
                          ("clutter_strength", "clutter_alpha")):
          lo, hi = ranges[rkey]
          assert lo - 1e-6 <= float(s[key]) <= hi + 1e-6, (split, key, s[key])
        assert int(s["thickness"]) in tuple(ranges["thickness"])
        np.testing.assert_allclose(s["label_prior"].sum(), 1.0, rtol=1e-5)
      jumps += [bool(s["jumped"]) for s in traj[1:]]
      moves += [float(np.abs(a["label_prior"] - b["label_prior"]).sum()) for a, b in
                zip(traj, traj[1:])]
  assert 0.05 < np.mean(jumps) < 0.3          # jump_prob 0.15
  assert np.mean(moves) > 0.1                 # the label prior moves every window


def test_a_meta_window_is_that_window_of_a_meta_stream(gen):
  w = gen["drift"]["windows"]
  roles = {"context": 3, "query": 2}
  m = dd.meta_window(gen, w + 1, roles)
  s = dd.make_device(gen, "meta", 1, roles, labelled_context=True)
  for r in roles:
    for k in ("image", "label"):
      np.testing.assert_array_equal(m[r][k], s[r][k][1])


def test_builders_store_the_generator_and_entries_are_device_window_pairs(cfg, gen, bench):
  devs = bench.devices("test")
  n, w = cfg.data.num_test_devices, cfg.data.drift.windows
  direct = dd.make_device(gen, "test", 2, dd.device_roles(gen, "test"))
  for role in ("context", "query", "oracle"):
    np.testing.assert_array_equal(devs[role]["image"][2], direct[role]["image"])
  np.testing.assert_array_equal(devs["shift"]["jumped"][2], direct["shift"]["jumped"])
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, 0)
  enc = task.encode_split(model, params, devs)
  assert enc["device_id"].tolist() == np.repeat(np.arange(n), w).tolist()
  assert enc["window"].tolist() == np.tile(np.arange(w), n).tolist()
  assert enc["query"]["emb"].shape == (n * w, cfg.data.query_size, cfg.model.embed_dim)
  assert "label" not in enc["context"]
  # entry (device 1, window 2) is that window of that device
  e = 1 * w + 2
  want = task.encode(model, params, devs["query"]["image"][1, 2])["emb"]
  np.testing.assert_allclose(enc["query"]["emb"][e], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(enc["query"]["label"][e], devs["query"]["label"][1, 2])


def test_global_images_come_from_the_global_pool_and_the_training_ranges(cfg, bench):
  src = bench.global_source()
  assert len(src) == cfg.data.num_global_devices * cfg.data.global_images_per_device
  ex = src[0]
  assert ex["image"].shape == (cfg.data.size, cfg.data.size) and 0 <= ex["label"] < 10
  b = bench.global_batches(4, seed=0)
  np.testing.assert_array_equal(b[3]["image"], bench.global_batches(4, seed=0)[3]["image"])


@pytest.mark.parametrize("key,value,match", [
    ("data.context_size", 0, "context_size=0 is invalid"),
    ("data.oracle_size", 0, "at least one image"),
    ("data.drift.windows", 0, "at least one window"),
    ("data.drift.jump_prob", 1.5, r"in \[0, 1\]"),
    ("data.drift.rotation_step", -1.0, ">= 0"),
    ("data.jitter", 9, "between 0 and"),
])
def test_bad_stream_configs_are_refused_before_any_work(cfg, tmp_path, key, value, match):
  assert_refused_before_any_work(cfg, key, value, match, tmp_path)


def test_the_main_job_runs_on_drifting_digits_and_reports_every_window(cfg, data_dir, tmp_path,
                                                                         monkeypatch):
  monkeypatch.setenv("MMPG_DATA_DIR", data_dir)
  # What is task-generic and runs end to end on video QA already (test_entry_point: the tta
  # and cdc_mmpg families) is left out, and Persona's grids keep one value each (every rule and
  # scope has its own unit test in test_persona.py): compiling is most of this test's time.
  # One ablation stage (K = 1) exercises the ablation path (the others call the same code).
  cfg = cfg.copy_and_resolve_references()
  cfg.method_families = ("baselines", "persona")
  cfg.persona.update(dict(assignment=("min_edit",), refine_scopes=("population",)))
  cfg.persona.ablations.update(dict(prototypes=(1,), epsilons=(), frozen_heads=False))
  res = main.run(cfg, str(tmp_path / "run"))
  w = cfg.data.drift.windows
  assert res["task"] == "image_classification" and res["windows_per_device"] == w
  assert res["num_eval_devices"] == cfg.data.num_test_devices
  m = res["methods"]
  for name in ("global", "fta_k5", "tent", "prior_em", "oracle", "duet", "persona_single",
               "persona", "persona_dynamic", "persona_k1"):
    assert name in m, name
    assert len(m[name]["per_device"]["accuracy"]) == cfg.data.num_test_devices * w
    pw = m[name]["per_window"]["accuracy"]
    assert len(pw) == w and len(m[name]["per_window"]["accuracy_ood"]) == w
    np.testing.assert_allclose(np.mean(pw), m[name]["metrics"]["accuracy"], rtol=1e-6)
  for name in ("prior_em", "duet", "persona_single", "persona", "persona_dynamic",
               "persona_k1"):
    assert m[name]["device_backward_passes"] == 0 and m[name]["labels_used_per_device"] == 0
  assert set(m["persona_dynamic"]["selected_hparams"]) == {"assignment", "rate", "scope",
                                                          "prototypes"}
  assert {"duet", "editor", "prototypes"} <= set(res["persona"])
  report = (tmp_path / "run" / "report.md").read_text()
  assert "## Per window position" in report and "| method (test) | w0 |" in report
  assert "## Ablations" in report and m["persona_k1"]["varies"] == "1 prototypes"
  assert json.loads((tmp_path / "run" / "results.json").read_text())["windows_per_device"] == w
  # when to ask: every policy's curve over the streams, its share of requests set on validation
  rp = res["deployment"]["request_policies"]
  assert rp["method"] == "persona" and rp["windows"] == w
  points = {(p["policy"], p["budget"]): p for p in rp["points"]}
  assert points[("always", None)]["rate"]["test"] == 1.0
  assert points[("never", None)]["rate"]["test"] == 0.0
  assert points[("never", None)]["metric"]["test"]["accuracy"] == pytest.approx(
      m["global"]["metrics"]["accuracy"])
  assert points[("always", None)]["metric"]["test"]["accuracy"] == pytest.approx(
      m["persona"]["metrics"]["accuracy"])
  for policy in ("every_k", "drift", "learned"):
    assert points[(policy, 0.0)]["rate"]["test"] == 0.0
    assert points[(policy, 1.0)]["rate"]["validation"] == 1.0
  assert set(rp["kept_share"]) == {str(b) for b in cfg.deploy.budgets}
  assert "## Request policies: when a device asks" in report
  assert (tmp_path / "run" / "request_policies.png").exists()
  # over seeds: aggregate pools the kept shares and averages the rollback and traffic rows
  out = aggregate.main([str(tmp_path / "run"), str(tmp_path / "run")])
  assert "Request policies for `persona`'s edits over 2 runs" in out
  assert "Label-free rollback over 2 runs" in out and "Compressed traffic over 2 runs" in out
  assert "| persona | int8 | float32 |" in out and "| persona | int8 | int8 |" in out
