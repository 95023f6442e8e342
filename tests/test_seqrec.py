"""The sequential-recommendation task (tasks/seqrec.py) on MovieLens-100K: metrics against the
numpy reference, the rows a device's roles become, config checks, and the main job end to end
at smoke size."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpg_jax import config_checks, main, rec_metrics, tasks
from mmpg_jax.tasks import seqrec

from conftest import ROOT


@pytest.fixture(scope="module")
def cfg():
  import importlib.util
  spec = importlib.util.spec_from_file_location("seqrec_cfg", f"{ROOT}/configs/seqrec_movielens.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


@pytest.fixture(scope="module")
def setup(cfg, tmp_path_factory):
  c = cfg.copy_and_resolve_references()
  c.data.data_dir = str(tmp_path_factory.mktemp("seqrec_data"))
  task = tasks.build(c)
  model = task.build_model()
  params = task.init_params(model, 0)
  return c, task, model, params


def test_per_user_metrics_match_the_numpy_reference(setup):
  _, task, _, _ = setup
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(12, 100)).round(1).astype(np.float32)      # ties occur
  labels = np.zeros((12, 100), np.float32)
  labels[np.arange(12), rng.integers(0, 100, 12)] = 1
  got = jax.vmap(task.metric_values)(jnp.asarray(scores), {"label": jnp.asarray(labels)})
  want = rec_metrics.ranking(scores, labels)
  for k in (5, 10, 20):
    np.testing.assert_allclose(got[f"ndcg@{k}"], want[f"ndcg@{k}"], rtol=1e-5)
    np.testing.assert_allclose(got[f"hr@{k}"], want[f"hr@{k}"])
  np.testing.assert_allclose(got["uauc"], rec_metrics.user_auc(scores, labels), rtol=1e-5)
  ref = [rec_metrics.logloss(s, l) for s, l in zip(scores, labels)]
  np.testing.assert_allclose(got["logloss"], ref, rtol=1e-5)
  nan = task.metric_values(jnp.asarray(scores[0]).at[int(labels[0].argmax())].set(jnp.nan),
                           {"label": jnp.asarray(labels[0])})
  assert float(nan["hr@20"]) == 0 and float(nan["uauc"]) == 0     # a diverged model ranks last
  pooled = task.pooled_metrics["auc"]({k: np.asarray(v) for k, v in got.items()})
  assert pooled == pytest.approx(rec_metrics.all_metrics(scores, labels)["auc"])


def test_a_device_becomes_rows_its_methods_score(setup):
  c, task, model, params = setup
  bench = task.prepare_data()
  raw = bench.devices("test")
  feats = task.encode_split(model, params, raw)
  n = c.data.num_test_devices
  q, s = feats["query"], feats["support"]
  assert q["user"].shape == (n, 100, 32) and q["label"].shape == (n, 100)
  assert (q["label"][:, 0] == 1).all() and (q["label"].sum(1) == 1).all()
  np.testing.assert_array_equal(q["user"][:, 0], q["user"][:, 57])   # one window per target
  assert s["label"].shape == (n, 50) and (s["weight"] == 1).all()     # >= 10 positions each
  assert feats["context"]["elements"].shape == (n, 1, 10, 32)
  assert task.anchor_elements(jax.tree.map(lambda x: x[0], feats["context"]))["clicks"].shape \
      == (10, 32)
  # scores of the rows = the model's scores of (window, candidates), end to end
  direct = model.apply({"params": params}, raw["target"]["window"][:3],
                       raw["target"]["candidates"][:3])
  rows = jax.vmap(lambda f: task.scores(model, params, f))(jax.tree.map(lambda x: x[:3], q))
  np.testing.assert_allclose(rows, direct, rtol=2e-5, atol=2e-5)
  # users arrive in time slices ordered by their target's time
  w = feats["window"]
  assert set(w.tolist()) == set(range(c.data.time_windows))
  ts = raw["timestamp"]
  assert ts[w == 0].max() <= ts[w == c.data.time_windows - 1].min()
  # the support loss ignores padded rows
  sup = jax.tree.map(lambda x: jnp.asarray(x[0]), s)
  zeroed = dict(sup, weight=sup["weight"].at[25:].set(0.0), label=sup["label"].at[25:].set(1.0))
  half = dict(sup, **{k: v[:25] for k, v in sup.items()})
  assert float(task.loss(model, params, zeroed)) == pytest.approx(
      float(task.loss(model, params, half)), rel=1e-5)


def test_an_item_outside_the_vocabulary_is_refused_not_clamped(setup):
  c, task, model, params = setup
  raw = task.prepare_data().devices("validation")
  raw["target"]["candidates"][3, 7] = task.prepared().num_items + 5
  with pytest.raises(ValueError, match="target candidates: item id.*outside the vocabulary"):
    task.encode_split(model, params, raw)


@pytest.mark.parametrize("key,value,match", [
    ("data.num_test_devices", 7, "the preprocessing gives 35"),
    ("data.context_size", 3, "one click window"),
    ("data.min_interactions", 3, "at least 5"),
    ("baselines.include", ("global", "oracle"), "no oracle data"),
    ("baselines.include", ("global", "tent"), "no unsupervised objective"),
    ("persona.meta_devices", 10 ** 6, "at most the 3851 training positions"),
])
def test_bad_seqrec_configs_are_refused_before_any_work(setup, tmp_path, key, value, match):
  c = setup[0].copy_and_resolve_references()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    main.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_the_main_job_runs_on_movielens_and_reports_every_method(setup, tmp_path):
  c = setup[0].copy_and_resolve_references()
  # Compiling is most of this test's time: one ADR budget, one value per Persona grid (every
  # rule and scope has its unit test in test_persona.py).
  c.adr.update(dict(k_sweep=(2,), ablations=()))
  c.persona.update(dict(assignment=("nearest",), refine_scopes=("population",)))
  c.persona.ablations.update(dict(frozen_heads=False))
  res = main.run(c, str(tmp_path / "run"))
  assert res["task"] == "seqrec" and res["num_eval_devices"] == c.data.num_test_devices
  assert res["num_ood_devices"] == c.data.num_ood_devices
  assert res["window_positions"] == c.data.time_windows and "windows_per_device" not in res
  m = res["methods"]
  assert set(m) == {"global", "fta_k50", "cdc_mmpg", "duet", "persona_single", "persona",
                    "persona_dynamic"}
  for name, r in m.items():
    for metric in ("uauc", "auc", "ndcg@10", "hr@10", "logloss"):
      assert np.isfinite(r["metrics"][metric]) and np.isfinite(r["metrics"][metric + "_ood"])
    assert 0 <= r["metrics"]["auc"] <= 1 and "auc" not in r["per_device"]
    assert len(r["per_device"]["uauc"]) == c.data.num_test_devices
  for name in ("cdc_mmpg", "duet", "persona_single", "persona", "persona_dynamic"):
    assert m[name]["device_backward_passes"] == 0 and m[name]["labels_used_per_device"] == 0
    assert m[name]["uplink_bytes"] > 0 and m[name]["downlink_bytes"] > 0
  assert m["fta_k50"]["labels_used_per_device"] == 50
  assert m["fta_k50"]["device_backward_passes"] > 0
  report = (tmp_path / "run" / "report.md").read_text()
  assert "MovieLens-100K" in report and "3851 training positions" in report
  assert "## Per window position" in report and "| method (test) | w0 |" in report
  assert json.loads((tmp_path / "run" / "results.json").read_text())["task"] == "seqrec"


def test_time_slices_are_equal_and_ordered():
  ts = np.array([5, 1, 3, 3, 9, 0, 7, 2])
  w = seqrec.time_slices(ts, 4)
  assert np.bincount(w).tolist() == [2, 2, 2, 2]
  order = np.argsort(ts, kind="stable")
  assert (np.diff(w[order]) >= 0).all()
