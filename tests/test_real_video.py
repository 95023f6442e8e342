"""Real video datasets on fixture files in the upstream formats
(data/video_fixtures.py): the TFDS builders' examples, the build summary, bad input, the masked
device model, and the main job end to end on each dataset at smoke size."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_refused_before_any_work

from mmpg_jax import main, tasks
from mmpg_jax.core import config_loader
from mmpg_jax.data import real_video as rv
from mmpg_jax.data import tfds_real_video as trv
from mmpg_jax.data import video_files as vf
from mmpg_jax.data import video_fixtures, video_text
from mmpg_jax.models import video_lmm
from mmpg_jax.tasks import _video

CONFIGS = {"msrvtt_qa": "msrvtt_qa.py", "msvd_qa": "msvd_qa.py",
           "msrvtt_retrieval": "msrvtt_retrieval.py"}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  return video_fixtures.write_all(str(tmp_path_factory.mktemp("video_fixtures")))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("real_video_tfds"))


def smoke(name, fixtures, data_root):
  c = config_loader.load(CONFIGS[name], "smoke")
  c.data.manual_dir = fixtures[name]
  c.data.data_dir = data_root
  return c


def test_msrvtt_qa_builders_yield_the_fixture_questions(fixtures, data_root):
  c = smoke("msrvtt_qa", fixtures, data_root)
  bench = trv.prepare(c.data)
  src = trv.source(c.data)
  s = bench.summary()
  # 90 videos, the last of each split without features: its 4 questions counted, not used
  assert s["videos_with_features"] == 87
  assert {k: v["without_features"] for k, v in s["samples"].items()} == {
      "train": 4, "val": 4, "test": 4}
  assert s["samples"]["test"]["oov_answers"] == 3           # "purple": never a training answer
  assert s["devices"]["kind"] == "category" and s["devices"]["count"] == 6
  roles = [s["devices"][r] for r in ("global", "meta", "validation", "test")]
  assert sorted(sum(roles, [])) == list(range(6))            # disjoint, every category once
  # the vocabularies come from the global and meta devices' training questions only
  cloud = [r for d in roles[0] + roles[1] for r in src.train_of[d]]
  assert src.answers == vf.answer_vocab(cloud, c.data.num_answers)
  assert set(src.words[2:]) == {w for r in cloud for w in video_text.tokenize(r["text"])}
  # cloud splits: one example per cloud video, one per in-vocabulary training question
  videos = bench.cloud.as_data_source(split="videos")
  assert len(videos) == len(src.cloud_videos)
  v0, m0 = src.video(src.cloud_videos[0])
  np.testing.assert_array_equal(videos[0]["video"], v0)
  np.testing.assert_array_equal(videos[0]["frame_mask"], m0)
  rows = bench.global_source()
  assert len(rows) == sum(len(src.train_of[d]) for d in roles[0])
  assert rows[0]["questions"].shape == (1, c.data.question_len) and rows[0]["answers"][0] >= 0
  batch = bench.global_batches(8, seed=0)[0]
  assert batch["video"].shape == (8, c.data.frames, c.data.feature_dim)
  assert batch["frame_mask"].shape == (8, c.data.frames) and batch["answers"].shape == (8, 1)
  # evaluation devices: every role with features, masks, tokens; the query from the test split
  test = bench.devices("test")
  n = c.data
  assert test["query"]["video"].shape == (len(roles[3]), n.query_size, n.frames, n.feature_dim)
  assert test["context"]["question"].shape == (len(roles[3]), n.context_size, n.question_len)
  assert "answer" not in test["context"] and (test["support"]["answer"] >= 0).all()
  assert test["device_id"].tolist() == roles[3]
  test_videos = {r["video"] for r in src.samples["test"]}
  held = {r["video"] for d in roles[3] for r in src.heldout_of[d]}
  assert held <= test_videos
  # a video of 3 frames (T = 4): padded and masked; of 14: sampled
  lengths = {v: len(src.store.get(v)) for v in src.store.ids}
  short = next(v for v, k in lengths.items() if k == 3)
  assert src.video(short)[1].tolist() == [1, 1, 1, 0]
  long = next(v for v, k in lengths.items() if k == 14)
  assert src.video(long)[1].tolist() == [1, 1, 1, 1]
  # meta devices draw labelled samples of the meta devices only
  meta = bench.meta_device(5, {"context": 3, "query": 4})
  assert meta["query"]["questions"].shape == (4, 1, n.question_len)
  assert meta["context"]["video"].shape == (3, n.frames, n.feature_dim)
  np.testing.assert_array_equal(meta["query"]["answers"],
                                bench.meta_device(5, {"context": 3, "query": 4})["query"]["answers"])
  # ... their context and query from different videos, as on an evaluation device
  def video_set(role):
    return {tuple(np.round(v.ravel()[:4], 5)) for v in role["video"]}
  assert not video_set(meta["context"]) & video_set(meta["query"])
  # the cloud's encoding of meta devices: one asked question per context sample
  task = tasks.build(c)
  model = task.build_model()
  params = task.init_params(model, 0)
  enc = task.encode_meta(model, params, task.meta_devices([0, 1], 4))
  assert enc["context"]["q"].shape[:2] == enc["context"]["frames"].shape[:2] == (2, n.context_size)
  assert enc["query"]["q"].shape[:3] == (2, 4, 1)


def test_msrvtt_qa_categories_without_the_info_file_come_from_the_questions(fixtures, tmp_path):
  import shutil
  folder = tmp_path / "msrvtt_qa"
  shutil.copytree(fixtures["msrvtt_qa"], folder)
  os.remove(folder / "videodatainfo.json")
  c = smoke("msrvtt_qa", fixtures, str(tmp_path / "tfds"))
  with_info = trv.source(c.data).device_of
  c.data.manual_dir = str(folder)
  assert trv.source(c.data).device_of == with_info          # MSRVTT-QA's category_id


def test_msvd_devices_are_kmeans_clusters_recorded_in_the_build(fixtures, data_root):
  c = smoke("msvd_qa", fixtures, data_root)
  bench = trv.prepare(c.data)
  s = bench.summary()
  assert s["devices"]["kind"] == "k-means cluster" and s["devices"]["count"] == 6
  centres = np.asarray(s["kmeans_centres"])
  assert centres.shape == (6, c.data.feature_dim)
  src = trv.source(c.data)
  # held-out videos join the nearest centre of a k-means fit on training videos only
  test_vid = src.samples["test"][0]["video"]
  emb = rv.vd.mean_embedding(src.store.get(test_vid))
  assert src.device_of[test_vid] == int(((centres - emb) ** 2).sum(-1).argmin())


def test_msrvtt_retrieval_galleries_are_the_1k_a_videos_of_a_category(fixtures, data_root):
  c = smoke("msrvtt_retrieval", fixtures, data_root)
  bench = trv.prepare(c.data)
  src = trv.source(c.data)
  test = bench.devices("test")
  content = test["query"]["content"]
  assert all(len(set(row.tolist())) == len(row) for row in content)   # distinct videos
  number = {i: v for v, i in src.video_number.items()}
  pairs = dict(vf.read_retrieval_test(os.path.join(c.data.manual_dir, rv.TEST_PAIRS)))
  assert all(number[int(i)] in pairs for i in content.ravel())
  rows = bench.global_source()
  assert len(rows) == sum(len(src.train_of[d]) for d in src.roles["global"])
  assert rows[0]["caption"].shape == (c.data.caption_len,)


@pytest.mark.parametrize("name,break_it,match", [
    ("msrvtt_qa", lambda d: os.rename(f"{d}/features", f"{d}/elsewhere"),
     r"frame features not found at .*features: expected a folder of <video_id>.npy"),
    ("msrvtt_qa", lambda d: os.remove(f"{d}/test_qa.json"),
     r"the test question file is missing from .*: expected one of \['test_qa.json'"),
    ("msrvtt_qa", lambda d: open(f"{d}/val_qa.json", "w").write('[{"question": "q?",\n "a": 1}]'),
     r"val_qa.json: entry 0 lacks \['answer', 'video_id'\]"),
    ("msrvtt_qa", lambda d: np.save(f"{d}/features/video0.npy", np.zeros((5, 7), np.float32)),
     r"video0.npy has shape \(5, 7\); expected \[frames, 16\]"),
    ("msrvtt_retrieval", lambda d: os.remove(f"{d}/videodatainfo.json"),
     r"MSRVTT's video info is missing .*videodatainfo.json"),
    ("msvd_qa", lambda d: np.savez(f"{d}/features.npz", **{"clip_a": np.zeros((3, 16))}),
     r"none of the \d+ samples of .*train_qa.json has frame features .*pattern vid<id>.* "
     r"\['clip_a'\]"),
])
def test_bad_files_are_named_with_the_format_expected(fixtures, tmp_path, name, break_it, match):
  import shutil
  folder = str(tmp_path / name)
  shutil.copytree(fixtures[name], folder)
  break_it(folder)
  c = smoke(name, fixtures, str(tmp_path / "tfds"))
  c.data.manual_dir = folder
  with pytest.raises(vf.VideoDataError, match=match):
    trv.prepare(c.data)


def test_bad_real_video_configs_are_refused_before_any_work(fixtures, data_root, tmp_path):
  c = smoke("msrvtt_qa", fixtures, data_root)
  assert_refused_before_any_work(c, "data.manual_dir", "", "name the folder holding", tmp_path)
  assert_refused_before_any_work(c, "data.num_ood_devices", 2, "no out-of-distribution",
                                 tmp_path)
  assert_refused_before_any_work(c, "fda.meta_query_size", 100, "come from different videos",
                                 tmp_path)
  assert_refused_before_any_work(c, "data.oracle_size", 40, "validation device .* lower them",
                                 tmp_path)


def test_masked_pooling_and_elements_see_only_real_frames():
  pool = video_lmm.TemporalPool(8)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)      # 2 videos of 3 frames
  padded = jnp.concatenate([x, jnp.asarray(rng.normal(size=(2, 2, 5)), jnp.float32)], 1)
  mask = jnp.asarray([[1, 1, 1, 0, 0]] * 2, jnp.float32)
  p = pool.init(jax.random.key(0), x)
  np.testing.assert_allclose(pool.apply(p, padded, mask), pool.apply(p, x), atol=1e-6)
  np.testing.assert_allclose(pool.apply(p, x, jnp.ones((2, 3))), pool.apply(p, x), atol=1e-6)
  el = _video.frame_elements(padded, mask).reshape(2, 4, 10)
  np.testing.assert_allclose(el[:, :2], _video.frame_elements(x).reshape(2, 2, 10), atol=1e-6)
  # the padded steps repeat the last real frame, still
  np.testing.assert_allclose(el[:, 2:, :5], jnp.broadcast_to(x[:, 2:3], (2, 2, 5)), atol=1e-6)
  assert float(jnp.abs(el[:, 2:, 5:]).max()) == 0.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_main_job_runs_on_each_fixture(fixtures, data_root, tmp_path, name):
  c = smoke(name, fixtures, data_root)
  # Compiling is most of this test's time: the families' own tests cover every row; here the
  # data path end to end (global model, FTA and oracle, meta-training, CDC-MMPG, report).
  c.method_families = ("baselines", "cdc_mmpg")
  c.fda.bases = ("global",)             # no global_meta family here: nothing to edit on top of
  c.baselines.include = ("global", "fta", "oracle")
  c.adr.update(dict(k_sweep=(2,), ablations=()))
  c.cdc_robust.variants = ()
  res = main.run(c, str(tmp_path / "run"))
  task = tasks.build(c)
  m = res["methods"]
  assert {"global", "oracle", "cdc_mmpg"} <= set(m)
  assert m["cdc_mmpg"]["device_backward_passes"] == 0
  for r in m.values():
    assert np.isfinite(r["metrics"][task.selection_metric.name])
    assert len(r["per_device"][task.selection_metric.name]) == c.data.num_test_devices
  report = (tmp_path / "run" / "report.md").read_text()
  assert f"Data: {name} from" in report and "whose video has no features, not used" in report
  assert json.loads((tmp_path / "run" / "results.json").read_text())["task"] == task.name
