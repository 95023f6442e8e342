"""The sequential-recommendation task (tasks/seqrec.py) on MovieLens-100K: metrics against the
numpy reference, the rows a device's roles become, config checks, and the main job end to end
at smoke size."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_refused_before_any_work

from mmpg_jax import main, tasks
from mmpg_jax.core import config_errors, rec_metrics
from mmpg_jax.tasks import seqrec


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
    ("data.protocol", "official", "0 under data.protocol='official'"),
    ("data.protocol", "offical", "'cold_ood' .* or 'official'"),
    ("model.classifier_form", "hyper", "expected 'dense' .* or 'generated'"),
])
def test_bad_seqrec_configs_are_refused_before_any_work(setup, tmp_path, key, value, match):
  assert_refused_before_any_work(setup[0], key, value, match, tmp_path)


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
  # training length chosen on validation: the global model's and DUET's curves are reported
  curves = res["training_curves"]
  assert set(curves) == {"global", "duet"}
  assert curves["global"]["curve"]["step"] == list(range(c.train.eval_every,
                                                         c.train.num_steps + 1,
                                                         c.train.eval_every))
  assert set(curves["global"]["curve"]) >= {"step", "uauc", "ndcg@10", "hr@10"}
  assert curves["duet"]["curve"]["step"][0] == 0
  assert "## Validation curves" in report and (tmp_path / "run" / "validation_curves.png").exists()
  # a user is served once: a policy decides which users ask (one window position each)
  rp = res["deployment"]["request_policies"]
  assert rp["windows"] == 1 and rp["method"] == "persona"
  assert rp["metrics"] == ["uauc", "ndcg@10"]
  assert len(rp["kept_share"]["0.1"]["drift"]["test"]["ndcg@10"]) == 3   # share, interval
  # the deployment studies again on the finished run, with another deploy block: nothing is
  # evaluated again, every method's figures stay, the studies follow the new config
  c2 = c.copy_and_resolve_references()
  c2.deploy.update(dict(encodings=("float32", "int4"), int8_model=False, budgets=(0.3,)))
  again = main.redeploy(c2, str(tmp_path / "run"))
  assert [r["encoding"] for r in again["deployment"]["traffic"]["persona"]["rows"]] == [
      "float32", "int4"]
  assert set(again["deployment"]["request_policies"]["kept_share"]) == {"0.3"}
  for name, r in res["methods"].items():
    assert again["methods"][name]["metrics"] == r["metrics"], name
  assert json.loads((tmp_path / "run" / "results.json").read_text())["deployment"] == json.loads(
      json.dumps(again["deployment"]))
  with pytest.raises(FileNotFoundError, match="deploy_only reruns"):
    main.redeploy(c2, str(tmp_path / "nothing_here"))
  assert set(res["deployment"]["rollback"]) == set(res["deployment"]["traffic"]) - {
      "_int8_model_unedited"} == {"persona"}


def test_the_official_protocol_tests_every_user_warm(cfg, tmp_path):
  """data.protocol='official' (the `official` variant): no cold group, every user validated
  and tested, the report saying where the official code chose its epoch."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("seqrec_cfg2",
                                                f"{ROOT}/configs/seqrec_movielens.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke,official,global_only")
  c.data.data_dir = str(tmp_path / "data")
  task = tasks.build(c)
  f = task.prepared().figures(c.data)
  assert f["cold_users"] == 0 and f["test_users"] == f["users"] == c.data.max_users
  res = main.run(c, str(tmp_path / "run"))
  assert res["num_ood_devices"] == 0 and res["num_eval_devices"] == c.data.max_users
  assert set(res["methods"]) == {"global"}
  assert "uauc_ood" not in res["methods"]["global"]["metrics"]
  report = (tmp_path / "run" / "report.md").read_text()
  assert "Protocol 'official'" in report and "keeps the epoch that scores best on the test" \
      in report
  # the printed table carries no empty columns: no OOD group, no oracle margin
  from mmpg_jax.reporting import report as report_lib
  head = report_lib.headline_table(res, task)[0]
  assert head.startswith("| method | uauc test | labels |") and "OOD" not in head


def test_time_slices_are_equal_and_ordered():
  ts = np.array([5, 1, 3, 3, 9, 0, 7, 2])
  w = seqrec.time_slices(ts, 4)
  assert np.bincount(w).tolist() == [2, 2, 2, 2]
  order = np.argsort(ts, kind="stable")
  assert (np.diff(w[order]) >= 0).all()


# ---- files in the official text format as the data --------------------------------------------

def _write_official_files(d, rng, users=8, items=80, neg_train=4, neg_test=9):
  """train.txt / test.txt as the official scripts write them: per user its targets in time
  order, each as 1 + negatives contiguous rows (positive first), the click window of the
  previous clicks left-aligned. User 0 has no training target (no history)."""
  fmt = lambda s: ",".join(str(v) for v in s)
  train, test = [], []
  for u in range(users):
    clicks = rng.choice(np.arange(1, items + 1), 8, replace=False).tolist()
    n_train = 0 if u == 0 else 1 + u % 4
    for t in range(n_train + 1):
      hist = (clicks[max(0, t - 10):t] + [0] * 10)[:10]
      pos = clicks[t]
      negs = [i for i in rng.permutation(np.arange(1, items + 1)).tolist() if i not in clicks]
      k = neg_test if t == n_train else neg_train
      block = [f"{100 + u};{pos};{fmt([0] * 10)};{fmt(hist)};1"]
      block += [f"{100 + u};{n};{fmt([0] * 10)};{fmt(hist)};0" for n in negs[:k]]
      (test if t == n_train else train).extend(block)
  (d / "train.txt").write_text("\n".join(train) + "\n")
  (d / "test.txt").write_text("\n".join(test) + "\n")


def test_official_text_files_are_a_data_source_with_validation_held_out(cfg, tmp_path):
  from mmpg_jax.data import pipeline, seqrec_text
  from mmpg_jax.data import tfds_movielens as tml
  _write_official_files(tmp_path, np.random.default_rng(0))
  c = cfg.copy_and_resolve_references()
  c.data.update(dict(name="seqrec_text", manual_dir=str(tmp_path), num_cold_users=2,
                     eval_negatives=9, max_users=0, data_dir=str(tmp_path / "prepared")))
  src = tml.prepared(c.data)
  f = src.figures(c.data)
  assert (f["users"], f["users_without_history"], f["test_blocks"]) == (8, 1, 8)
  assert f["cold_users"] == 2 and f["test_ood_users"] == 2 and f["test_users"] == 6
  u0 = int(np.flatnonzero(src.raw_users == 100)[0])           # the user without history
  val = src.eval_users("validation")
  assert u0 not in val and not src.cold[val].any() and len(val) == f["validation_users"]
  # the cloud never trains on a validation block or a cold user's block
  cloud = list(src.global_rows(c.data))
  held = {int(src.blocks[u][-1]) for u in val}
  assert not held & {int(r[2]["timestamp"]) for r in cloud}
  assert not src.cold[[u for u, _, _ in cloud]].any()
  assert f["training_positions"] == len(cloud)
  for u in val:
    d = src.eval_device(c.data, "validation", int(u))
    b = src.blocks[u][-1]
    assert d["target"]["candidates"].shape == (10,) and d["target"]["label"][0] == 1
    assert d["target"]["candidates"][0] == src.train["candidates"][b][0]
    assert d["support"]["mask"].sum() == len(src.blocks[u]) - 1
    t = src.eval_device(c.data, "test", int(u))
    # test support: every training block, newest first (the validation block included)
    assert t["support"]["candidates"][0, 0] == src.train["candidates"][b][0]
  # the user without history keeps an empty support, not an error
  assert len(src.blocks[u0]) == 0
  split = "test_ood" if src.cold[u0] else "test"
  assert u0 in src.eval_users(split)
  assert src.eval_device(c.data, split, u0)["support"]["mask"].sum() == 0
  # through the TFDS builders and the task, with the device counts the data gives
  c.data.update(dict(num_val_devices=f["validation_users"], num_test_devices=f["test_users"],
                     num_ood_devices=f["test_ood_users"], num_global_devices=f["warm_users"]))
  task = tasks.build(c)
  task.validate_config(c)
  model = task.build_model()
  params = task.init_params(model, 0)
  feats = task.encode_split(model, params, task.prepare_data().devices("validation"))
  assert feats["query"]["label"].shape == (len(val), 10)
  assert "DUET/Persona text format" in task.report_notes(c)[0]


def test_text_files_out_of_time_order_are_refused_with_the_line(cfg, tmp_path):
  from mmpg_jax.data import seqrec_text
  _write_official_files(tmp_path, np.random.default_rng(0))
  c = cfg.copy_and_resolve_references()
  c.data.update(dict(name="seqrec_text", manual_dir=str(tmp_path), num_cold_users=2,
                     eval_negatives=9, max_users=0))
  lines = (tmp_path / "train.txt").read_text().splitlines()
  # user 103 has 4 training targets (lines 16-35): swap its last two blocks
  blocks = [lines[i:i + 5] for i in range(0, len(lines), 5)]
  users = [b[0].split(";")[0] for b in blocks]
  i = max(k for k, u in enumerate(users) if u == "103")
  blocks[i - 1], blocks[i] = blocks[i], blocks[i - 1]
  (tmp_path / "train.txt").write_text("\n".join(l for b in blocks for l in b) + "\n")
  with pytest.raises(seqrec_text.FormatError, match=r"train.txt:\d+: this target's click window "
                                                    r"lacks the item clicked"):
    seqrec_text.TextSource(c.data.to_dict())
  with pytest.raises(seqrec_text.FormatError, match="max_users applies to MovieLens-100K only"):
    seqrec_text.TextSource(dict(c.data.to_dict(), max_users=5))


def test_a_missing_manual_dir_is_refused_before_any_work(cfg, tmp_path):
  c = cfg.copy_and_resolve_references()
  c.data.update(dict(name="seqrec_text", manual_dir=str(tmp_path / "nowhere"), max_users=0))
  with pytest.raises(config_errors.ConfigError, match="must hold train.txt and test.txt"):
    main.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_small_cloud_data_is_batched_from_memory_in_the_same_order(setup, monkeypatch):
  """A cloud source small enough is read once into arrays; its batches are the streamed ones,
  batch for batch (so results do not depend on which path ran)."""
  from mmpg_jax.data import pipeline
  _, task, _, _ = setup
  bench = task.prepare_data()
  fast = bench.global_batches(16, seed=3)
  monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", 0)
  slow = bench.global_batches(16, seed=3)
  assert type(fast).__name__ == "_InMemory" and type(slow).__name__ == "_Checked"
  n = len(bench.global_source()) // 16
  for i in (0, 1, n - 1, n, 3 * n + 2):          # epochs reshuffle alike
    a, b = fast[i], slow[i]
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_the_written_duet_files_read_back_as_the_packaged_source(tmp_path):
  """data/duet_files.py writes MovieLens-100K as the official scripts do; read back through
  data.name='seqrec_text' (each user's last training target held out for validation), the
  cloud trains on the same targets with the same negatives as the packaged source under the
  official protocol, and the test targets are the same."""
  from mmpg_jax.data import duet_files
  from mmpg_jax.data import movielens as ml
  from mmpg_jax.data import seqrec_text
  cfg = dict(duet_files.data_config(seed=3, max_users=12), support_positions=10)
  prep = ml.preprocess(cfg)
  f = duet_files.write(str(tmp_path), cfg, prep)
  n = np.asarray([len(s) for s in prep.sequences])
  assert f["users"] == 12 and f["train_targets"] == int((n - 2).sum()) and f["test_targets"] == 12
  src = seqrec_text.TextSource(dict(cfg, name="seqrec_text", manual_dir=str(tmp_path),
                                    max_users=0))
  text_rows = [r for _, _, r in src.global_rows(cfg)]
  packaged = [r for _, _, r in ml.global_rows(prep, cfg)]
  assert len(text_rows) == len(packaged) == int((n - 3).sum())
  for a, b in zip(text_rows, packaged):
    for k in ("window", "candidates", "label"):
      np.testing.assert_array_equal(a[k], b[k])
  for u in range(12):
    a = src.eval_device(cfg, "test", u)["target"]
    b = ml.eval_device(prep, cfg, "test", u)["target"]
    for k in ("window", "candidates", "label"):
      np.testing.assert_array_equal(a[k], b[k])
    # validation: the same target and window (its negatives are drawn again by the reader)
    a = src.eval_device(cfg, "validation", u)["target"]
    b = ml.eval_device(prep, cfg, "validation", u)["target"]
    np.testing.assert_array_equal(a["window"], b["window"])
    assert a["candidates"][0] == b["candidates"][0]
  with pytest.raises(ValueError, match="no cold users"):
    duet_files.write(str(tmp_path / "x"), dict(cfg, num_cold_users=2))
