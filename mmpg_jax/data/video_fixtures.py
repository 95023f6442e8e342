r"""Small fixture files in the exact upstream formats of MSRVTT-QA, MSVD-QA and MSRVTT
retrieval, for the tests and the configs' smoke variants (nothing here is real data):

  python -m mmpg_jax.data.video_fixtures --out=/tmp/video_fixtures
  # -> /tmp/video_fixtures/{msrvtt_qa,msvd_qa,msrvtt_retrieval}/

Each video's frame features are its category's direction plus an object's direction plus
noise (so a device model can learn something from them); some videos are shorter than a
config's T (padding), some longer (sampling); a few questions name a video without features
(counted in the build summary) and the test split has answers never seen in training (OOV).
"""
import csv
import json
import os

import numpy as np
from absl import app, flags

CATEGORIES = 6
OBJECTS = ("dog", "cat", "car", "man", "woman", "ball", "guitar", "food")
ACTIONS = ("run", "play", "cook", "sing", "drive", "dance")


def _video_features(rng, cat_dirs, obj_dirs, cat, obj, dim):
  n = int(rng.choice((3, 6, 9, 14)))         # frames at 1 fps: shorter and longer than T
  x = cat_dirs[cat] + obj_dirs[obj] + 0.3 * rng.normal(size=(n, dim))
  return x.astype(np.float32)


def _videos(rng, num, dim, key):
  cat_dirs = rng.normal(size=(CATEGORIES, dim))
  obj_dirs = rng.normal(size=(len(OBJECTS), dim))
  out = []
  for i in range(num):
    cat, obj = i % CATEGORIES, int(rng.integers(len(OBJECTS)))
    out.append({"id": i, "name": key.format(i), "category": cat, "object": obj,
                "action": int((cat + obj) % len(ACTIONS)),
                "x": _video_features(rng, cat_dirs, obj_dirs, cat, obj, dim)})
  return out


def _write_features(folder, videos, as_npz):
  if as_npz:
    np.savez(os.path.join(folder, "features.npz"), **{v["name"]: v["x"] for v in videos})
  else:
    os.makedirs(os.path.join(folder, "features"), exist_ok=True)
    for v in videos:
      np.save(os.path.join(folder, "features", v["name"] + ".npy"), v["x"])


def _questions(v, split, qid):
  o, a = OBJECTS[v["object"]], ACTIONS[v["action"]]
  qs = [("what is in the video?", o), ("what is the " + o + " doing?", a),
        ("who is in the video?", o), ("what happens in the video?", a)]
  if split == "test" and v["id"] % 5 == 0:
    qs.append(("what color is it?", "purple"))            # an answer training never gives
  return [{"answer": ans, "category_id": v["category"], "id": qid + j, "question": q,
           "video_id": v["id"]} for j, (q, ans) in enumerate(qs)]


def _split_of(i):
  r = (i // CATEGORIES) % 5                  # per category: 3 of 5 train, 1 val, 1 test
  return "train" if r < 3 else ("val" if r == 3 else "test")


def write_qa(folder: str, dataset: str, num_videos: int = 90, dim: int = 16, seed: int = 0):
  """MSRVTT-QA (video ids video<i>, with videodatainfo.json) or MSVD-QA (vid<i>)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  key = "video{}" if dataset == "msrvtt_qa" else "vid{}"
  videos = _videos(rng, num_videos, dim, key)
  # the last video of each split has no features: its questions are counted, not used
  without = {max(v["id"] for v in videos if _split_of(v["id"]) == s) for s in
             ("train", "val", "test")}
  _write_features(folder, [v for v in videos if v["id"] not in without],
                  as_npz=dataset == "msvd_qa")
  for split in ("train", "val", "test"):
    rows = []
    for v in videos:
      if _split_of(v["id"]) == split:
        rows += _questions(v, split, len(rows))
    with open(os.path.join(folder, f"{split}_qa.json"), "w") as f:
      json.dump(rows, f)
  if dataset == "msrvtt_qa":
    _write_info(folder, videos, captions_per_video=2)


def _write_info(folder, videos, captions_per_video):
  sentences = []
  for v in videos:
    for j in range(captions_per_video):
      words = [f"a {OBJECTS[v['object']]} is {ACTIONS[v['action']]}ing",
               f"someone films a {OBJECTS[v['object']]}",
               f"a clip of a {OBJECTS[v['object']]} that {ACTIONS[v['action']]}s"][j % 3]
      sentences.append({"caption": words, "video_id": v["name"],
                        "sen_id": len(sentences)})
  info = {"info": {"year": "fixture"},
          "videos": [{"category": v["category"], "url": "", "video_id": v["name"],
                      "start time": 0.0, "end time": float(len(v["x"])),
                      "split": {"train": "train", "val": "validate", "test": "test"}[
                          _split_of(v["id"])], "id": v["id"]} for v in videos],
          "sentences": sentences}
  with open(os.path.join(folder, "videodatainfo.json"), "w") as f:
    json.dump(info, f)


def write_retrieval(folder: str, num_videos: int = 120, dim: int = 16, seed: int = 0):
  """MSRVTT retrieval: videodatainfo.json, MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  videos = _videos(rng, num_videos, dim, "video{}")
  _write_features(folder, videos[:-1], as_npz=False)        # the last has no features
  _write_info(folder, videos, captions_per_video=3)
  test = [v for v in videos if _split_of(v["id"]) == "test"]
  train = [v for v in videos if _split_of(v["id"]) != "test"]
  with open(os.path.join(folder, "MSRVTT_train.9k.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["video_id"])
    w.writerows([[v["name"]] for v in train])
  with open(os.path.join(folder, "MSRVTT_JSFUSION_test.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["key", "vid_key", "video_id", "sentence"])
    for i, v in enumerate(test):
      w.writerow([f"ret{i}", f"msr{v['id']}", v["name"],
                  f"a {OBJECTS[v['object']]} is {ACTIONS[v['action']]}ing"])


def write_all(out: str) -> dict:
  paths = {name: os.path.join(out, name) for name in ("msrvtt_qa", "msvd_qa",
                                                      "msrvtt_retrieval")}
  write_qa(paths["msrvtt_qa"], "msrvtt_qa")
  write_qa(paths["msvd_qa"], "msvd_qa")
  write_retrieval(paths["msrvtt_retrieval"])
  return paths


_OUT = flags.DEFINE_string("out", None, "folder the three fixture folders are written to")


def main(argv):
  del argv
  for name, path in write_all(_OUT.value).items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
