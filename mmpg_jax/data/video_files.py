"""Readers of real video datasets as distributed: pre-extracted per-video
frame features, MSRVTT-QA / MSVD-QA question files, MSRVTT's video info and the MSRVTT
retrieval lists. Nothing is downloaded: the user places the files (WORKSPACE.md, "Real video
datasets"). Every reader checks what it reads and names the file (and line or key) with the
format it expected.

Features: per video a float array [T, D] of frame features (e.g. CLIP ViT-B/32 at 1 fps,
D = 512; ViT-L/14, D = 768), either a folder of `<video_id>.npy` files or one `.npz` keyed by
video id. `fix_length` brings a video to the config's T frames: a shorter one is zero-padded
with a mask, a longer one sampled uniformly (frame i of T at round(i (n - 1) / (T - 1))).

Question files (MSRVTT-QA and MSVD-QA as distributed with the datasets' paper code): a JSON
list of {"question", "answer", "video_id", ...} per split (train_qa.json, val_qa.json,
test_qa.json), or a CSV with the columns question, answer, video_id. The integer video_id
names a video by `video_key` (MSRVTT: "video{id}", MSVD: "vid{id}").

Answers: the top-K training answers form the vocabulary (ties by first appearance); a question
whose answer is outside it keeps the out-of-vocabulary id -1: training skips it, and at test
time it counts as wrong (the standard protocol: accuracy over all test questions).
"""
import collections
import csv
import json
import os
import time

import numpy as np
from absl import logging


class VideoDataError(ValueError):
  """A video dataset file is missing or malformed."""


def logged(items, what: str, every: float = 10.0):
  """Yields `items`, logging every `every` seconds how many are done, the rate and the ETA: a
  build reads every feature file of a real dataset once (minutes for MSRVTT's 10k videos)."""
  items = list(items)
  n, t0 = len(items), time.time()
  last = t0
  for i, x in enumerate(items):
    yield x
    now = time.time()
    if now - last >= every:
      rate = (i + 1) / (now - t0)
      logging.info("%s: %d/%d | %.1f/s, ETA %.0fs", what, i + 1, n, rate, (n - i - 1) / rate)
      last = now


# ---- frame features ------------------------------------------------------------------------------

class FeatureStore:
  """Per-video frame features [n, D] from a folder of `<video_id>.npy` or one `.npz`."""

  def __init__(self, path: str, dim: int):
    self.path, self.dim = path, int(dim)
    if os.path.isdir(path):
      self._npz = None
      self.ids = sorted(f[:-4] for f in os.listdir(path) if f.endswith(".npy"))
    elif os.path.isfile(path) and path.endswith(".npz"):
      self._npz = np.load(path)
      self.ids = sorted(self._npz.files)
    else:
      raise VideoDataError(
          f"frame features not found at {path}: expected a folder of <video_id>.npy files or "
          f"one .npz keyed by video id, each video a float array [frames, {dim}]")
    if not self.ids:
      raise VideoDataError(f"{path} holds no features (<video_id>.npy files or .npz keys)")
    self._ids = set(self.ids)

  def __contains__(self, video_id: str) -> bool:
    return video_id in self._ids

  def get(self, video_id: str) -> np.ndarray:
    if video_id not in self._ids:
      raise VideoDataError(f"{self.path} has no features for video {video_id!r}")
    where = (os.path.join(self.path, video_id + ".npy") if self._npz is None
             else f"{self.path}[{video_id!r}]")
    try:
      x = (np.load(where) if self._npz is None else self._npz[video_id])
    except Exception as e:
      raise VideoDataError(f"{where} cannot be read as a numpy array: {e}") from e
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise VideoDataError(f"{where} has shape {x.shape}; expected [frames, {self.dim}] "
                           f"(data.feature_dim={self.dim})")
    if x.shape[0] == 0 or not np.isfinite(x).all():
      raise VideoDataError(f"{where} has no frames or non-finite values")
    return x.astype(np.float32)


def fix_length(x: np.ndarray, frames: int) -> tuple:
  """[n, D] -> ([frames, D], mask [frames]): zero-padded and masked, or sampled uniformly."""
  n = len(x)
  if n <= frames:
    out = np.zeros((frames, x.shape[1]), np.float32)
    out[:n] = x
    mask = np.zeros(frames, np.float32)
    mask[:n] = 1.0
    return out, mask
  idx = np.round(np.arange(frames) * (n - 1) / max(frames - 1, 1)).astype(int)
  return x[idx].astype(np.float32), np.ones(frames, np.float32)


# ---- question files --------------------------------------------------------------------------------

QA_FIELDS = ("question", "answer", "video_id")


def read_qa(path: str, video_key: str) -> list:
  """[{'question', 'answer', 'video'}] of a JSON list or CSV question file, in file order."""
  if not os.path.exists(path):
    raise VideoDataError(f"question file {path} is missing: expected a JSON list of "
                         f"{{'question', 'answer', 'video_id'}} or a CSV with those columns")
  rows = []
  if path.endswith(".json"):
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise VideoDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(data, list):
      raise VideoDataError(f"{path}: expected a JSON list of questions, got "
                           f"{type(data).__name__}")
    for i, q in enumerate(data):
      missing = [k for k in QA_FIELDS if not isinstance(q, dict) or k not in q]
      if missing:
        raise VideoDataError(f"{path}: entry {i} lacks {missing} (each entry needs "
                             f"{QA_FIELDS})")
      rows.append(_qa_row(q, video_key, f"{path}: entry {i}"))
  else:
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f)
      missing = [k for k in QA_FIELDS if k not in (reader.fieldnames or [])]
      if missing:
        raise VideoDataError(f"{path}: header {reader.fieldnames} lacks columns {missing}")
      for q in reader:
        _check_csv_row(q, path, reader.line_num, QA_FIELDS)
        rows.append(_qa_row(q, video_key, f"{path}:{reader.line_num}"))
  if not rows:
    raise VideoDataError(f"{path} holds no questions")
  return rows


def _check_csv_row(row: dict, path: str, line: int, fields) -> None:
  """A CSV record with more or fewer fields than its header is an error (a comma inside an
  unquoted question would otherwise shift every field silently)."""
  if None in row:
    raise VideoDataError(f"{path}:{line}: more fields than the header (quote fields that "
                         f"contain commas)")
  if any(row.get(k) is None for k in fields):
    raise VideoDataError(f"{path}:{line}: fewer fields than the header")


def _qa_row(q, video_key: str, where: str) -> dict:
  question, answer = str(q["question"]).strip(), str(q["answer"]).strip()
  if not question or not answer:
    raise VideoDataError(f"{where}: empty question or answer")
  vid = str(q["video_id"]).strip()
  return {"question": question, "answer": answer,
          "video": video_key.format(vid) if vid.isdigit() else vid}


def qa_categories(path: str, video_key: str) -> dict:
  """{video: category} from a MSRVTT-QA JSON file's `category_id` fields ({} if it has none):
  MSRVTT's categories without its video info file."""
  if not path.endswith(".json"):
    return {}
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  out = {}
  for q in data:
    if isinstance(q, dict) and "category_id" in q and "video_id" in q:
      vid = str(q["video_id"]).strip()
      out[video_key.format(vid) if vid.isdigit() else vid] = int(q["category_id"])
  return out


def answer_vocab(train_rows: list, k: int) -> list:
  """The k most frequent training answers (ties: first appearance)."""
  counts = collections.Counter(r["answer"] for r in train_rows)
  first = {}
  for i, r in enumerate(train_rows):
    first.setdefault(r["answer"], i)
  return sorted(counts, key=lambda a: (-counts[a], first[a]))[:k]


def answer_ids(rows: list, vocab: list) -> np.ndarray:
  """Answer ids in `vocab`, -1 out of vocabulary (wrong at test time, skipped in training)."""
  index = {a: i for i, a in enumerate(vocab)}
  return np.asarray([index.get(r["answer"], -1) for r in rows], np.int32)


def with_features(rows: list, store: FeatureStore) -> tuple:
  """(rows whose video has features, the number without): the build summary and report.md
  count the second, nothing is dropped silently."""
  kept = [r for r in rows if r["video"] in store]
  return kept, len(rows) - len(kept)


# ---- MSRVTT video info and retrieval lists ------------------------------------------------------

def read_msrvtt_info(path: str) -> dict:
  """MSRVTT's videodatainfo / MSRVTT_data.json: {'category': {video_id: int}, 'split':
  {video_id: str}, 'captions': {video_id: [str]}}."""
  if not os.path.exists(path):
    raise VideoDataError(f"MSRVTT video info {path} is missing: expected the JSON with "
                         f"'videos' [{{'video_id', 'category', ...}}] and 'sentences' "
                         f"[{{'video_id', 'caption'}}] (videodatainfo.json / MSRVTT_data.json)")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise VideoDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
  for key in ("videos", "sentences"):
    if key not in data:
      raise VideoDataError(f"{path}: no '{key}' list (keys: {sorted(data)[:8]})")
  cat, split, caps = {}, {}, collections.defaultdict(list)
  for i, v in enumerate(data["videos"]):
    if "video_id" not in v or "category" not in v:
      raise VideoDataError(f"{path}: videos[{i}] lacks 'video_id' or 'category'")
    cat[v["video_id"]] = int(v["category"])
    split[v["video_id"]] = v.get("split", "")
  for i, s in enumerate(data["sentences"]):
    if "video_id" not in s or "caption" not in s:
      raise VideoDataError(f"{path}: sentences[{i}] lacks 'video_id' or 'caption'")
    caps[s["video_id"]].append(str(s["caption"]).strip())
  return {"category": cat, "split": split, "captions": dict(caps)}


def read_video_list(path: str) -> list:
  """Video ids of a list file: a CSV with a `video_id` column (MSRVTT_train.9k.csv), or one id
  per line (train_list_jsfusion.txt)."""
  if not os.path.exists(path):
    raise VideoDataError(f"video list {path} is missing: expected a CSV with a 'video_id' "
                         f"column or one video id per line")
  with open(path, encoding="utf-8-sig", newline="") as f:    # -sig: a BOM is not an id
    text = f.read()
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if lines and "video_id" in next(csv.reader([lines[0]])):
    reader = csv.DictReader(lines)
    out = []
    for r in reader:
      _check_csv_row(r, path, reader.line_num, ("video_id",))
      out.append(r["video_id"].strip())
    return out
  return lines


def read_retrieval_test(path: str) -> list:
  """The MSRVTT 1k-A test pairs (MSRVTT_JSFUSION_test.csv): [(video_id, sentence)]."""
  if not os.path.exists(path):
    raise VideoDataError(f"retrieval test list {path} is missing: expected the CSV with "
                         f"columns key, vid_key, video_id, sentence (MSRVTT_JSFUSION_test.csv)")
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f)
    missing = [k for k in ("video_id", "sentence") if k not in (reader.fieldnames or [])]
    if missing:
      raise VideoDataError(f"{path}: header {reader.fieldnames} lacks columns {missing}")
    out = []
    for r in reader:
      _check_csv_row(r, path, reader.line_num, ("video_id", "sentence"))
      if not r["video_id"] or not r["sentence"]:
        raise VideoDataError(f"{path}:{reader.line_num}: empty video_id or sentence")
      out.append((r["video_id"].strip(), r["sentence"].strip()))
  return out
