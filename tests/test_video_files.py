"""Readers of the real video datasets' files (data/video_files.py), on fixtures written in the
upstream formats: CLIP frame features (.npy folder or .npz), MSRVTT-QA / MSVD-QA questions
(JSON list or CSV), MSRVTT's video info JSON, the 9k training list and the 1k-A test CSV."""
import json

import numpy as np
import pytest

from mmpg_jax.data import video_files as vf


def _features(tmp_path, ids=("video0", "video1", "video7"), dim=8, lengths=(3, 12, 5)):
  rng = np.random.default_rng(0)
  feats = {v: rng.normal(size=(n, dim)).astype(np.float32) for v, n in zip(ids, lengths)}
  folder = tmp_path / "feats"
  folder.mkdir()
  for v, x in feats.items():
    np.save(folder / f"{v}.npy", x)
  np.savez(tmp_path / "feats.npz", **feats)
  return feats, folder, tmp_path / "feats.npz"


def test_features_from_a_folder_and_an_npz_agree_and_get_a_fixed_length(tmp_path):
  feats, folder, npz = _features(tmp_path)
  a, b = vf.FeatureStore(str(folder), 8), vf.FeatureStore(str(npz), 8)
  assert a.ids == b.ids == ["video0", "video1", "video7"]
  for v, x in feats.items():
    np.testing.assert_array_equal(a.get(v), x)
    np.testing.assert_array_equal(b.get(v), x)
  short, mask = vf.fix_length(feats["video0"], 6)             # 3 frames: padded and masked
  assert mask.tolist() == [1, 1, 1, 0, 0, 0] and (short[3:] == 0).all()
  np.testing.assert_array_equal(short[:3], feats["video0"])
  long, mask = vf.fix_length(feats["video1"], 4)              # 12 frames: 0, 4, 7, 11
  np.testing.assert_array_equal(long, feats["video1"][[0, 4, 7, 11]])
  assert mask.sum() == 4


def test_bad_features_name_the_file_and_both_shapes(tmp_path):
  _, folder, _ = _features(tmp_path)
  with pytest.raises(vf.VideoDataError, match=r"video1\.npy has shape \(12, 8\); expected "
                                              r"\[frames, 16\]"):
    vf.FeatureStore(str(folder), 16).get("video1")
  with pytest.raises(vf.VideoDataError, match="folder of <video_id>.npy files or one .npz"):
    vf.FeatureStore(str(tmp_path / "nowhere"), 8)
  with pytest.raises(vf.VideoDataError, match="no features for video 'video3'"):
    vf.FeatureStore(str(folder), 8).get("video3")


def _qa_json(path, rows):
  path.write_text(json.dumps([{"answer": a, "category_id": 0, "id": i, "question": q,
                               "video_id": v} for i, (q, a, v) in enumerate(rows)]))


def test_msrvtt_qa_json_and_csv_read_alike_with_a_top_k_answer_vocabulary(tmp_path):
  train = [("what is a man doing?", "dance", 0), ("who is singing?", "woman", 1),
           ("what is a woman doing?", "sing", 1), ("what is shown?", "dance", 7),
           ("who dances?", "man", 0), ("what plays?", "guitar", 5)]
  _qa_json(tmp_path / "train_qa.json", train)
  rows = vf.read_qa(str(tmp_path / "train_qa.json"), "video{}")
  assert [r["video"] for r in rows] == ["video0", "video1", "video1", "video7", "video0",
                                        "video5"]
  csv_path = tmp_path / "train.csv"
  csv_path.write_text("question,answer,video_id\n" + "\n".join(
      f"{q},{a},video{v}" for q, a, v in train) + "\n")
  assert vf.read_qa(str(csv_path), "video{}") == rows
  vocab = vf.answer_vocab(rows, 3)
  assert vocab == ["dance", "woman", "sing"]                  # count, then first appearance
  test = [{"answer": "dance"}, {"answer": "guitar"}, {"answer": "sing"}]
  assert vf.answer_ids(test, vocab).tolist() == [0, -1, 2]    # OOV: -1, wrong at test time
  # MSVD-QA names its videos vid<id>
  _qa_json(tmp_path / "msvd.json", [("what is a cat doing?", "play", 12)])
  assert vf.read_qa(str(tmp_path / "msvd.json"), "vid{}")[0]["video"] == "vid12"


def test_questions_without_features_are_counted_not_dropped(tmp_path):
  _, folder, _ = _features(tmp_path)
  _qa_json(tmp_path / "q.json", [("a?", "x", 0), ("b?", "y", 5), ("c?", "z", 7)])
  kept, missing = vf.with_features(vf.read_qa(str(tmp_path / "q.json"), "video{}"),
                                   vf.FeatureStore(str(folder), 8))
  assert [r["video"] for r in kept] == ["video0", "video7"] and missing == 1


@pytest.mark.parametrize("name,text,match", [
    ("bad.json", '[{"question": "q?", "answer": "a"}]', r"entry 0 lacks \['video_id'\]"),
    ("bad.json", '[{"question": "q?",\n "answer": }]', r"bad.json:2: not valid JSON"),
    ("bad.csv", "question,answer\nq?,a\n", r"lacks columns \['video_id'\]"),
    ("bad.csv", "question,answer,video_id\nq?,a,1\nr?,b\n", r"bad.csv:3: fewer fields"),
    ("bad.csv", "question,answer,video_id\nq?,a,1\n\nwhat, and why?,b,2\n",
     r"bad.csv:4: more fields than the header"),                # the blank line counts
    ("bad.json", '[{"question": "", "answer": "a", "video_id": 1}]', "empty question"),
])
def test_a_malformed_question_file_names_the_file_and_the_place(tmp_path, name, text, match):
  (tmp_path / name).write_text(text)
  with pytest.raises(vf.VideoDataError, match=match):
    vf.read_qa(str(tmp_path / name), "video{}")


def test_msrvtt_info_and_retrieval_lists(tmp_path):
  info = {"info": {}, "videos": [{"video_id": f"video{i}", "category": i % 3, "split": "train",
                                  "id": i} for i in range(4)],
          "sentences": [{"video_id": f"video{i % 4}", "caption": f"caption {i}", "sen_id": i}
                        for i in range(8)]}
  (tmp_path / "videodatainfo.json").write_text(json.dumps(info))
  got = vf.read_msrvtt_info(str(tmp_path / "videodatainfo.json"))
  assert got["category"] == {"video0": 0, "video1": 1, "video2": 2, "video3": 0}
  assert got["captions"]["video1"] == ["caption 1", "caption 5"]
  (tmp_path / "MSRVTT_train.9k.csv").write_text("\ufeffvideo_id\nvideo0\nvideo2\n")  # BOM
  (tmp_path / "train_list.txt").write_text("video0\nvideo2\n")
  assert vf.read_video_list(str(tmp_path / "MSRVTT_train.9k.csv")) == ["video0", "video2"]
  assert vf.read_video_list(str(tmp_path / "train_list.txt")) == ["video0", "video2"]
  (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
      "key,vid_key,video_id,sentence\nret0,msr7020,video7020,a man is singing\n"
      "ret1,msr7021,video7021,a cat plays\n")
  assert vf.read_retrieval_test(str(tmp_path / "MSRVTT_JSFUSION_test.csv")) == [
      ("video7020", "a man is singing"), ("video7021", "a cat plays")]
  (tmp_path / "broken.json").write_text('{"videos": []}')
  with pytest.raises(vf.VideoDataError, match="no 'sentences' list"):
    vf.read_msrvtt_info(str(tmp_path / "broken.json"))
  with pytest.raises(vf.VideoDataError, match="MSRVTT_JSFUSION_test.csv"):
    vf.read_retrieval_test(str(tmp_path / "missing.csv"))


# ---- devices from the data ---------------------------------------------------------------------

def test_msvd_devices_are_seeded_clusters_of_mean_embeddings(tmp_path):
  from mmpg_jax.data import video_devices as vd
  rng = np.random.default_rng(1)
  folder = tmp_path / "msvd"
  folder.mkdir()
  centres = rng.normal(size=(3, 8)) * 5
  truth = np.repeat(np.arange(3), 4)
  ids = [f"vid{i}" for i in range(12)]
  for v, c in zip(ids, truth):
    np.save(folder / f"{v}.npy", (centres[c] + 0.1 * rng.normal(size=(6, 8))).astype(np.float32))
  store = vf.FeatureStore(str(folder), 8)
  labels, found = vd.clusters(store, ids, 3, seed=0)
  again, _ = vd.clusters(store, ids, 3, seed=0)
  np.testing.assert_array_equal(labels, again)
  # the three planted groups come back as three devices (up to naming)
  assert len({tuple(np.flatnonzero(labels == g)) for g in range(3)}
             ^ {tuple(np.flatnonzero(truth == g)) for g in range(3)}) == 0
  assert found.shape == (3, 8)
  with pytest.raises(vf.VideoDataError, match="1 <= k <= the 12 videos"):
    vd.clusters(store, ids, 13, seed=0)
  # two distinct videos, three devices asked: a device would be empty
  for v in ids:
    np.save(folder / f"{v}.npy", np.full((2, 8), 1.0 + (v in ids[:6]), np.float32)
            * np.eye(8, dtype=np.float32)[int(v in ids[:6])])
  with pytest.raises(vf.VideoDataError, match=r"left 1 of 3 devices without a video"):
    vd.clusters(vf.FeatureStore(str(folder), 8), ids, 3, seed=0)


def test_msrvtt_devices_are_categories_and_roles_are_disjoint():
  from mmpg_jax.data import video_devices as vd
  info = {"category": {f"video{i}": i % 20 for i in range(40)}}
  assert vd.categories(info, ["video3", "video23"]).tolist() == [3, 3]
  with pytest.raises(vf.VideoDataError, match="no category"):
    vd.categories(info, ["video99"])
  counts = {"global": 8, "meta": 6, "validation": 3, "test": 3}
  roles = vd.assign_roles(20, counts, seed=0)
  every = np.concatenate([roles[r] for r in vd.ROLES])
  assert len(every) == len(set(every.tolist())) == 20
  assert {r: len(v) for r, v in roles.items()} == counts
  assert vd.assign_roles(20, counts, seed=0)["test"].tolist() == roles["test"].tolist()
  with pytest.raises(vf.VideoDataError, match="ask for 21 devices"):
    vd.assign_roles(20, dict(counts, meta=7), seed=0)
  with pytest.raises(vf.VideoDataError, match=r"\['validation'\] have none"):
    vd.assign_roles(20, dict(counts, validation=0), seed=0)
