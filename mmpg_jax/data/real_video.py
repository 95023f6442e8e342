"""Real video datasets prepared for the video tasks: MSRVTT-QA, MSVD-QA and MSRVTT
text-to-video retrieval, from the files the user places in `data.manual_dir`
(`INSTRUCTIONS`; readers in video_files.py, devices in video_devices.py).

A *sample* is one question (QA: video, question, answer) or one caption (retrieval: video,
caption; its `content` is the video's number, so a hit is the right video). A *device* is one
MSRVTT category, or for MSVD one k-means cluster of the mean frame embeddings (fit on the
training split's videos only). Devices are split disjointly (seeded) into global-training,
meta-training, validation and test devices; every role a device plays draws on the
distributed splits:

  global devices       their training-split samples train the global model;
  meta devices         their training-split samples form fresh meta devices on the fly;
  validation / test    context (unlabelled), support and oracle (labelled) from the device's
                       training-split samples, disjoint; query from its held-out samples: the
                       distributed val split (validation devices) or test split (test
                       devices) for QA; the 1k-A test pairs for retrieval (its only held-out
                       captions; validation and test devices are different categories).

The cloud knows only global and meta devices: the word vocabulary (questions or captions) and
the answer vocabulary (the top `num_answers` training answers) are built from their
training samples, and a test device's text is never read before the final evaluation. An
out-of-vocabulary answer keeps id -1: training and labelled roles skip it, a query keeps it and
counts it wrong (accuracy over every test question, the standard protocol). A sample whose
video has no features is counted per split in `summary()` (and report.md), never dropped
silently.
"""
import collections
import hashlib
import os

import numpy as np

from mmpg_jax.data import video_devices as vd
from mmpg_jax.data import video_files as vf
from mmpg_jax.data.video_text import encode_text, word_vocab

GENERATOR_VERSION = 1
QA_DATASETS = ("msrvtt_qa", "msvd_qa")
RETRIEVAL_DATASETS = ("msrvtt_retrieval",)
DATASETS = QA_DATASETS + RETRIEVAL_DATASETS
VIDEO_KEY = {"msrvtt_qa": "video{}", "msvd_qa": "vid{}", "msrvtt_retrieval": "video{}"}
# MSRVTT's video info: one combined file, or the official release's two (merged)
INFO_FILES = ("videodatainfo.json", "MSRVTT_data.json", "train_val_videodatainfo.json",
              "test_videodatainfo.json")
TRAIN_LISTS = ("MSRVTT_train.9k.csv", "train_list_jsfusion.txt")
TEST_PAIRS = "MSRVTT_JSFUSION_test.csv"

INSTRUCTIONS = """\
Place the files of one dataset in a folder and pass it as --config.data.manual_dir=DIR:
  frame features (every dataset): DIR/features/<video_id>.npy, one float array [frames, D]
    per video (CLIP at 1 fps; D = data.feature_dim, 512 for ViT-B/32, 768 for ViT-L/14), or
    one DIR/features.npz keyed by video id (data.features names either);
    video ids: MSRVTT video0..video9999, MSVD vid1..vid1970 (the QA files' integer ids);
  msrvtt_qa: DIR/train_qa.json, val_qa.json, test_qa.json (MSRVTT-QA as distributed: a JSON
    list of {"question", "answer", "video_id"}; CSVs with those columns also read); the 20
    categories come from DIR/videodatainfo.json (or MSRVTT_data.json, or the release's
    train_val_videodatainfo.json + test_videodatainfo.json, merged), else from the question
    files' own category_id;
  msvd_qa: DIR/train_qa.json, val_qa.json, test_qa.json (MSVD-QA as distributed);
  msrvtt_retrieval: DIR/videodatainfo.json (or MSRVTT_data.json, or the two release files:
    categories and the 20 captions per video), DIR/MSRVTT_train.9k.csv (or train_list_jsfusion.txt) and
    DIR/MSRVTT_JSFUSION_test.csv (the 1k-A test pairs).
Nothing is downloaded."""


def _first_existing(folder: str, names, what: str) -> str:
  for n in names:
    if os.path.exists(os.path.join(folder, n)):
      return os.path.join(folder, n)
  raise vf.VideoDataError(f"{what} is missing from {folder}: expected one of {list(names)}.\n"
                          + INSTRUCTIONS)


def read_info(folder: str, required: bool = True) -> dict | None:
  """MSRVTT's video info from every info file present (merged), or None if none is and
  `required` is False."""
  paths = [os.path.join(folder, n) for n in INFO_FILES if os.path.exists(os.path.join(folder, n))]
  if not paths:
    if not required:
      return None
    _first_existing(folder, INFO_FILES, "MSRVTT's video info")     # raises, saying what to place
  info = {"category": {}, "split": {}, "captions": {}}
  for p in paths:
    part = vf.read_msrvtt_info(p)
    for k in info:
      info[k].update(part[k])
  return info


def _check_matched(rows, kept, store, path, key):
  """No sample of a file finding features means the feature files are named otherwise."""
  if rows and not kept:
    raise vf.VideoDataError(
        f"none of the {len(rows)} samples of {path} has frame features in {store.path}: the "
        f"samples name videos like {sorted({r['video'] for r in rows})[:3]} (pattern "
        f"{key.format('<id>')}), the features hold {store.ids[:3]}; name the feature files "
        f"by the annotation files' video ids")


def qa_file(folder: str, split: str) -> str:
  return _first_existing(folder, (f"{split}_qa.json", f"{split}_qa.csv"),
                         f"the {split} question file")


def input_files(cfg: dict) -> list:
  """The annotation files (and feature path) a data config reads: their state keys the
  prepared copy, so an edited file is prepared anew."""
  d = cfg.get("manual_dir", "")
  names = {"msrvtt_qa": [f"{s}_qa.{e}" for s in ("train", "val", "test") for e in ("json", "csv")]
                        + list(INFO_FILES),
           "msvd_qa": [f"{s}_qa.{e}" for s in ("train", "val", "test") for e in ("json", "csv")],
           "msrvtt_retrieval": list(INFO_FILES) + list(TRAIN_LISTS) + [TEST_PAIRS]}
  out = []
  for n in names.get(cfg.get("name"), []) + [cfg.get("features", "")]:
    p = os.path.abspath(os.path.join(d, n))
    if n and os.path.isdir(p):       # a features folder: every file's name, size and time
      h = hashlib.sha256()
      for e in sorted(os.scandir(p), key=lambda e: e.name):
        st = e.stat()
        h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
      out.append([p, h.hexdigest()[:16]])
    elif n and os.path.exists(p):
      st = os.stat(p)
      out.append([p, st.st_size, st.st_mtime_ns])
  return out


class Source:
  """One real video dataset, read and split into devices and roles (numpy; no JAX arrays kept).

  `cloud_videos` (the videos of global and meta devices, in a fixed order), `cloud_rows(role)`
  (a role's training samples as token/label rows), `eval_device(split, d)` (a validation or
  test device with its roles and features), `summary()` (the build summary)."""

  def __init__(self, cfg: dict):
    self.cfg = cfg
    self.name = cfg["name"]
    if self.name not in DATASETS:
      raise vf.VideoDataError(f"data.name={self.name!r}: real video datasets are {DATASETS}")
    self.qa = self.name in QA_DATASETS
    folder = cfg.get("manual_dir", "")
    if not folder or not os.path.isdir(folder):
      raise vf.VideoDataError(f"data.manual_dir={folder!r} is not a folder.\n" + INSTRUCTIONS)
    self.folder = folder
    self.store = vf.FeatureStore(os.path.join(folder, cfg["features"]), cfg["feature_dim"])
    self.missing = {}
    if self.qa:
      self._read_qa()
    else:
      self._read_retrieval()
    self._split_devices()
    self._vocabularies()

  # ---- reading ---------------------------------------------------------------------------------
  def _read_qa(self):
    key = VIDEO_KEY[self.name]
    self.samples = {}
    for split in ("train", "val", "test"):
      path = qa_file(self.folder, split)
      rows = vf.read_qa(path, key)
      self.samples[split], self.missing[split] = vf.with_features(rows, self.store)
      _check_matched(rows, self.samples[split], self.store, path, key)
      for r in self.samples[split]:
        r["text"] = r.pop("question")
    if self.name == "msrvtt_qa":
      # categories from the video info file, or from MSRVTT-QA's own category_id fields
      self.info = read_info(self.folder, required=False)
      if self.info is None:
        cats = {}
        for split in ("train", "val", "test"):
          cats.update(vf.qa_categories(qa_file(self.folder, split), key))
        if not cats:
          read_info(self.folder)           # neither: the error says which files to place
        self.info = {"category": cats}

  def _read_retrieval(self):
    self.info = read_info(self.folder)
    train = vf.read_video_list(_first_existing(self.folder, TRAIN_LISTS, "the 9k training list"))
    test = vf.read_retrieval_test(os.path.join(self.folder, TEST_PAIRS))
    rows = []
    no_caption = [v for v in train if v not in self.info["captions"]]
    if no_caption:
      raise vf.VideoDataError(f"{len(no_caption)} training video(s) have no caption in the "
                              f"video info file (e.g. {no_caption[:3]}); use the info file of "
                              f"the same MSRVTT release")
    for v in train:
      rows += [{"video": v, "text": c} for c in self.info["captions"][v]]
    test_rows = [{"video": v, "text": s} for v, s in test]
    self.samples = {}
    self.samples["train"], self.missing["train"] = vf.with_features(rows, self.store)
    self.samples["test"], self.missing["test"] = vf.with_features(test_rows, self.store)
    _check_matched(rows, self.samples["train"], self.store, "the 9k training list", "video{}")
    _check_matched(test_rows, self.samples["test"], self.store, TEST_PAIRS, "video{}")

  # ---- devices ---------------------------------------------------------------------------------
  def _split_devices(self):
    cfg = self.cfg
    videos = sorted({r["video"] for rows in self.samples.values() for r in rows})
    if self.name == "msvd_qa":
      train_videos = sorted({r["video"] for r in self.samples["train"]})
      _, self.centres = vd.clusters(self.store, train_videos, int(cfg["num_devices"]),
                                    int(cfg["seed"]))
      dev = vd.nearest_centre(self.store, videos, self.centres)
      self.num_devices = int(cfg["num_devices"])
    else:
      self.centres = None
      dev = vd.categories(self.info, videos)
      self.num_devices = int(dev.max()) + 1
    self.device_of = dict(zip(videos, dev.tolist()))
    present = sorted(set(dev.tolist()))        # a device id is its category (or cluster)
    counts = {"global": cfg["num_global_devices"], "meta": cfg["num_meta_devices"],
              "validation": cfg["num_val_devices"], "test": cfg["num_test_devices"]}
    self.roles = {r: [present[i] for i in ids] for r, ids in
                  vd.assign_roles(len(present), counts, int(cfg["seed"])).items()}
    held = "test" if not self.qa else None
    self.heldout_split = {"validation": held or "val", "test": held or "test"}
    # each device's training-split samples, and its held-out ones, in file order
    self.train_of = collections.defaultdict(list)
    for r in self.samples["train"]:
      self.train_of[self.device_of[r["video"]]].append(r)
    self.heldout_of = {}
    for split, source in self.heldout_split.items():
      held_rows = collections.defaultdict(list)
      for r in self.samples[source]:
        held_rows[self.device_of[r["video"]]].append(r)
      for d in self.roles[split]:
        self.heldout_of[d] = held_rows[d]
    cloud = set(self.roles["global"]) | set(self.roles["meta"])
    self.cloud_videos = sorted({r["video"] for d in cloud for r in self.train_of[d]})
    self.cloud_index = {v: i for i, v in enumerate(self.cloud_videos)}
    self.video_number = {v: i for i, v in enumerate(videos)}

  def _vocabularies(self):
    cfg = self.cfg
    cloud = [r for d in self.roles["global"] + self.roles["meta"] for r in self.train_of[d]]
    if not cloud:
      raise vf.VideoDataError("the global and meta devices hold no training samples with "
                              "features: check data.features and data.manual_dir")
    self.words = word_vocab((r["text"] for r in cloud), int(cfg["vocab_size"]))
    self.word_index = {w: i for i, w in enumerate(self.words)}
    if self.qa:
      self.answers = vf.answer_vocab(cloud, int(cfg["num_answers"]))
      self.answer_index = {a: i for i, a in enumerate(self.answers)}

  # ---- samples ---------------------------------------------------------------------------------
  def answer_id(self, r) -> int:
    return self.answer_index.get(r["answer"], -1)

  def labelled(self, rows):
    """Rows usable as labels: QA drops out-of-vocabulary answers (training skips them)."""
    return [r for r in rows if self.answer_id(r) >= 0] if self.qa else rows

  def text_field(self) -> str:
    return "question" if self.qa else "caption"

  def text_len(self) -> int:
    return int(self.cfg["question_len"] if self.qa else self.cfg["caption_len"])

  def row(self, r) -> dict:
    """A cloud row: the video's index in `cloud_videos`, tokens, label (answer or content)."""
    out = {"video_index": np.int32(self.cloud_index[r["video"]]),
           "device_id": np.int32(self.device_of[r["video"]])}
    tokens = encode_text(r["text"], self.word_index, self.text_len())
    if self.qa:
      out.update(questions=tokens[None], answers=np.asarray([self.answer_id(r)], np.int32))
    else:
      out.update(caption=tokens, content=np.int32(self.video_number[r["video"]]))
    return out

  def cloud_samples(self, role: str) -> list:
    """The labelled training samples of the global (role 'global') or meta devices."""
    return [r for d in self.roles[role] for r in self.labelled(self.train_of[d])]

  def cloud_rows(self, role: str) -> list:
    """`cloud_samples(role)` as cloud rows (tokenized)."""
    return [self.row(r) for r in self.cloud_samples(role)]

  def video(self, video_id: str) -> tuple:
    return vf.fix_length(self.store.get(video_id), int(self.cfg["frames"]))

  def role_sizes(self) -> dict:
    c = self.cfg
    return {"context": c["context_size"], "support": c["support_size"],
            "query": c["query_size"], "oracle": c["oracle_size"]}

  def _pool(self, d: int) -> list:
    """A device's training-split samples its roles draw from (retrieval: one caption per
    video, seeded, so a role is a gallery of distinct videos)."""
    rows = self.train_of[d]
    if self.qa:
      return rows
    rng = np.random.default_rng([int(self.cfg["seed"]), 31, d])
    by_video = collections.defaultdict(list)
    for r in rows:
      by_video[r["video"]].append(r)
    return [caps[int(rng.integers(len(caps)))] for caps in by_video.values()]

  def eval_device(self, split: str, d: int) -> dict:
    """Device d of a validation or test split: its roles, features and labels."""
    rows = self.eval_rows(split, d)
    return {"device_id": np.int32(d),
            **{role: self.role_arrays(r, labelled=role != "context") for role, r in rows.items()}}

  def eval_rows(self, split: str, d: int) -> dict:
    """{role: samples} of device d (no features read: the config check runs it first)."""
    sizes = self.role_sizes()
    rng = np.random.default_rng([int(self.cfg["seed"]), 23, d])
    pool = self._pool(d)
    order = rng.permutation(len(pool))
    ctx = [pool[i] for i in order[:sizes["context"]]]
    rest = self.labelled([pool[i] for i in order[sizes["context"]:]])
    need = sizes["context"] + sizes["support"] + sizes["oracle"]
    if len(ctx) < sizes["context"] or len(rest) < sizes["support"] + sizes["oracle"]:
      raise vf.VideoDataError(
          f"{split} device {d} has {len(pool)} training-split samples with features "
          f"({len(self.labelled(pool))} labelled); its roles need data.context_size + "
          f"support_size + oracle_size = {need}: lower them")
    held = self.heldout_of[d]
    if len(held) < sizes["query"]:
      raise vf.VideoDataError(
          f"{split} device {d} has {len(held)} held-out samples with features "
          f"({self.heldout_split[split]} split); data.query_size={sizes['query']}: lower it")
    query = [held[i] for i in np.sort(rng.permutation(len(held))[:sizes["query"]])]
    support = rest[:sizes["support"]]
    oracle = rest[sizes["support"]:sizes["support"] + sizes["oracle"]]
    return {"context": ctx, "support": support, "query": query, "oracle": oracle}

  def meta_shortfall(self, context: int, query: int) -> str | None:
    """Why some meta device cannot give a context and a query from different videos
    (`FeatureBenchmark.meta_device`), or None."""
    for d in self.roles["meta"]:
      rows = self.labelled(self.train_of[d])
      per_video = collections.Counter(r["video"] for r in rows)
      if self.qa:      # the context takes whole videos until it has enough questions
        ok = len(rows) - max(per_video.values(), default=0) - context + 1 >= query
      else:            # one caption per video in each role
        ok = len(per_video) >= context + query
      if not ok:
        return (f"meta device {d} has {len(rows)} labelled samples over {len(per_video)} "
                f"videos; a meta device's context and query come from different videos and "
                f"need data.context_size ({context}) + fda.meta_query_size ({query}) "
                f"{'samples' if self.qa else 'videos'}")
    return None

  def role_arrays(self, rows, labelled: bool) -> dict:
    vids = [self.video(r["video"]) for r in rows]
    out = {"video": np.stack([v for v, _ in vids]),
           "frame_mask": np.stack([m for _, m in vids]),
           self.text_field(): np.stack([encode_text(r["text"], self.word_index,
                                                    self.text_len()) for r in rows])}
    if labelled:
      if self.qa:
        out["answer"] = np.asarray([self.answer_id(r) for r in rows], np.int32)
      else:
        out["content"] = np.asarray([self.video_number[r["video"]] for r in rows], np.int32)
    return out

  # ---- what the build says -----------------------------------------------------------------
  def summary(self) -> dict:
    splits = {}
    for split, rows in self.samples.items():
      s = {"with_features": len(rows), "without_features": int(self.missing[split])}
      if self.qa:
        s["oov_answers"] = sum(self.answer_id(r) < 0 for r in rows)
      splits[split] = s
    out = {"dataset": self.name, "videos_with_features": len(self.video_number),
           "feature_dim": int(self.cfg["feature_dim"]), "frames": int(self.cfg["frames"]),
           "samples": splits, "word_vocab": len(self.words),
           "devices": {"kind": "k-means cluster" if self.centres is not None else "category",
                       "count": self.num_devices, **self.roles},
           "device_samples": {str(d): {"train": len(self.train_of[d]),
                                       "heldout": len(self.heldout_of.get(d, []))}
                              for d in range(self.num_devices)}}
    if self.qa:
      out["answer_vocab"] = len(self.answers)
    if self.centres is not None:
      out["kmeans_centres"] = np.round(np.asarray(self.centres), 6).tolist()
    return out

  def describe(self) -> str:
    """One paragraph for report.md."""
    s = self.summary()
    parts = ", ".join(f"{k} {v['with_features']} (+{v['without_features']} whose video has "
                      f"no features, not used"
                      + (f"; {v['oov_answers']} with an out-of-vocabulary answer, counted "
                         f"wrong when asked" if self.qa else "") + ")"
                      for k, v in s["samples"].items())
    dev = s["devices"]
    return (f"Data: {self.name} from {os.path.abspath(self.folder)} "
            f"({s['videos_with_features']} videos with {s['feature_dim']}-d frame features, "
            f"{s['frames']} frames each). Samples per distributed split: {parts}. "
            + (f"Answer vocabulary: the top {s['answer_vocab']} answers of the cloud's training "
               f"questions. " if self.qa else "")
            + f"Devices: {dev['count']} (one per {dev['kind']}); global {dev['global']}, meta "
            f"{dev['meta']}, validation {dev['validation']}, test {dev['test']}.")

