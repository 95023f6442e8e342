"""TFDS builders of the real video datasets with manual download (array_record, no
TensorFlow): the files the user placed in `data.manual_dir` (`MANUAL_DOWNLOAD_INSTRUCTIONS`),
read and split by `real_video.Source`.

`real_video_cloud`    what the cloud holds, from global and meta devices only:
                      split `videos` (one example per video: features [T, D], frame mask),
                      `global_train` (one labelled sample each: its video's index in `videos`,
                      tokens, answer or content) from the global devices, and `meta_train`
                      (the same from the meta devices: fresh meta devices draw on it).
`real_video_devices`  splits validation / test: one example per device with its roles
                      (context without labels, support, query, oracle) and their features.
The build summary (samples per split, those without features, out-of-vocabulary answers,
devices and their roles, MSVD's k-means centres) is the datasets' metadata (metadata.json).
Config names hash the data config, the generator's version and the source files' state.
"""
import functools
import json

import grain
import numpy as np
import tensorflow_datasets as tfds

from mmpg_jax.core.config_errors import need, positive
from mmpg_jax.data import pipeline
from mmpg_jax.data import real_video as rv
from mmpg_jax.data import tfds_moving_digits as tmd

DEVICE_SPLITS = ("validation", "test")


@functools.lru_cache(maxsize=2)
def _source(cfg_json: str):
  return rv.Source(json.loads(cfg_json))


def source(cfg) -> rv.Source:
  """The prepared source of a data config (cached: both builders and the task read it; the
  files' state is part of the key, so an edited file is read anew)."""
  d = tmd.data_config_dict(cfg)
  d["_files"] = rv.input_files(d)
  return _source(json.dumps(d, sort_keys=True))


class _RealVideoBase(tmd._Base):
  GENERATOR_VERSION = rv.GENERATOR_VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = rv.INSTRUCTIONS

  def __init__(self, *, data_cfg=None, **kwargs):
    if data_cfg is not None:
      data_cfg = tmd.data_config_dict(data_cfg)
      data_cfg["_files"] = rv.input_files(data_cfg)
    super().__init__(data_cfg=data_cfg, **kwargs)

  def _info_with_summary(self, features):
    src = source(self.builder_config.data)
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(build_summary=src.summary()))


def _row_features(cfg):
  L = cfg["question_len"] if cfg["name"] in rv.QA_DATASETS else cfg["caption_len"]
  f = {"video_index": np.int32, "device_id": np.int32}
  if cfg["name"] in rv.QA_DATASETS:
    f["questions"] = tfds.features.Tensor(shape=(1, L), dtype=np.int32)
    f["answers"] = tfds.features.Tensor(shape=(1,), dtype=np.int32)
  else:
    f["caption"] = tfds.features.Tensor(shape=(L,), dtype=np.int32)
    f["content"] = np.int32
  return f


class RealVideoCloud(_RealVideoBase):
  """The cloud's data: splits videos, global_train, meta_train."""

  def _info(self):
    cfg = self.builder_config.data
    t, dim = cfg["frames"], cfg["feature_dim"]
    # Features are stored once per video (split `videos`); a sample's `video` is empty.
    return self._info_with_summary({
        "video": tfds.features.Tensor(shape=(None, dim), dtype=np.float32),
        "frame_mask": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "device_id": np.int32,
        # samples (global_train, meta_train); zeros in `videos`
        **{k: v for k, v in _row_features(cfg).items() if k != "device_id"}})

  def _split_generators(self, dl_manager):
    return {"videos": self._generate_examples("videos"),
            "global_train": self._generate_examples("global"),
            "meta_train": self._generate_examples("meta")}

  def _generate_examples(self, part):
    return self._videos() if part == "videos" else self._rows(part)

  def expected_sizes(self):
    src = source(self.builder_config.data)
    return {"videos": len(src.cloud_videos), "global_train": len(src.cloud_samples("global")),
            "meta_train": len(src.cloud_samples("meta"))}     # counted, not tokenized

  def _blank(self):
    cfg = self.builder_config.data
    t, dim = cfg["frames"], cfg["feature_dim"]
    out = {"video": np.zeros((t, dim), np.float32), "frame_mask": np.zeros(t, np.float32)}
    for k, v in _row_features(cfg).items():
      if isinstance(v, tfds.features.Tensor):
        out[k] = np.zeros(v.shape, v.np_dtype)
      else:
        out[k] = np.int32(0)
    return out

  def _videos(self):
    src = source(self.builder_config.data)
    for i, v in enumerate(rv.vf.logged(src.cloud_videos, "real_video_cloud: videos")):
      video, mask = src.video(v)
      yield i, {**self._blank(), "video": video, "frame_mask": mask,
                "video_index": np.int32(i), "device_id": np.int32(src.device_of[v])}

  def _rows(self, role):
    src = source(self.builder_config.data)
    dim = self.builder_config.data["feature_dim"]
    for i, r in enumerate(src.cloud_rows(role)):
      yield i, {**r, "video": np.zeros((0, dim), np.float32),   # features live in `videos`
                "frame_mask": np.zeros(0, np.float32)}


class RealVideoDevices(_RealVideoBase):
  """Evaluation devices, one example per device with its roles: splits validation, test."""

  def _info(self):
    cfg = self.builder_config.data
    t, dim = cfg["frames"], cfg["feature_dim"]
    qa = cfg["name"] in rv.QA_DATASETS
    text, L = ("question", cfg["question_len"]) if qa else ("caption", cfg["caption_len"])
    device = {"device_id": np.int32}
    for role, n in source(cfg).role_sizes().items():
      f = {"video": tfds.features.Tensor(shape=(n, t, dim), dtype=np.float32),
           "frame_mask": tfds.features.Tensor(shape=(n, t), dtype=np.float32),
           text: tfds.features.Tensor(shape=(n, L), dtype=np.int32)}
      if role != "context":
        f["answer" if qa else "content"] = tfds.features.Tensor(shape=(n,), dtype=np.int32)
      device[role] = tfds.features.FeaturesDict(f)
    return self._info_with_summary(device)

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in DEVICE_SPLITS}

  def expected_sizes(self):
    src = source(self.builder_config.data)
    return {s: len(src.roles[s]) for s in DEVICE_SPLITS}

  def _generate_examples(self, split):
    src = source(self.builder_config.data)
    for i, d in enumerate(rv.vf.logged(src.roles[split], f"real_video_devices: {split}")):
      yield i, src.eval_device(split, d)


class FeatureBenchmark(pipeline.Benchmark):
  """A prepared real video dataset: global batches join each sample with its video's
  features; `meta_device(i, sizes)` draws meta device i from the meta devices' samples."""

  def _video_table(self):
    if getattr(self, "_videos", None) is None:
      try:
        src = self.cloud.as_data_source(split="videos")
        exs = [src[i] for i in range(len(src))]
      except Exception as e:
        raise pipeline._damaged(self.cloud, "reading split videos", e) from e
      self._videos = (np.stack([e["video"] for e in exs]),
                      np.stack([e["frame_mask"] for e in exs]))
    return self._videos

  def _with_video(self, e):
    videos, masks = self._video_table()
    e = {k: np.asarray(v) for k, v in e.items()}
    e["video"], e["frame_mask"] = videos[int(e["video_index"])], masks[int(e["video_index"])]
    return e

  def global_batches(self, batch_size: int, seed: int):
    src = self.global_source()
    if len(src) < batch_size:
      raise ValueError(f"global_train has {len(src)} samples, fewer than train.batch_size="
                       f"{batch_size}; lower the batch size or raise data.num_global_devices")
    self._video_table()
    ds = (grain.MapDataset.source(src).shuffle(seed=seed).repeat(None)
          .map(self._with_video).batch(batch_size, drop_remainder=True))
    return pipeline._Checked(ds, self.cloud)

  def _meta_rows(self):
    if getattr(self, "_meta", None) is None:
      try:
        src = self.cloud.as_data_source(split="meta_train")
        rows = [{k: np.asarray(v) for k, v in src[i].items() if k not in ("video",
                                                                         "frame_mask")}
                for i in range(len(src))]
      except Exception as e:
        raise pipeline._damaged(self.cloud, "reading split meta_train", e) from e
      by_device = {}
      for r in rows:
        by_device.setdefault(int(r["device_id"]), []).append(r)
      self._meta = [by_device[d] for d in sorted(by_device)]
    return self._meta

  def meta_device(self, index: int, sizes: dict) -> dict:
    """Meta device `index`: one meta device's labelled samples (seeded by the index) into
    roles of `sizes` ({role: n}, the cloud's view), each role from videos of its own, as an
    evaluation device's context and query are: a QA role takes whole videos (in a seeded
    order) until it has enough questions and draws from them; a retrieval role takes one
    caption of each of n videos."""
    pools = self._meta_rows()
    pool = pools[index % len(pools)]
    rng = np.random.default_rng([int(self.cfg["seed"]), 37, int(index)])
    by_video = {}
    for r in pool:
      by_video.setdefault(int(r["video_index"]), []).append(r)
    videos = [list(by_video)[i] for i in rng.permutation(len(by_video))]
    qa, at, out = "answers" in pool[0], 0, {"device_id": np.int32(index)}
    for role, n in sizes.items():
      if qa:
        rows = []
        while len(rows) < n and at < len(videos):
          rows += by_video[videos[at]]
          at += 1
        if len(rows) >= n:
          rows = [rows[i] for i in np.sort(rng.choice(len(rows), n, replace=False))]
      else:
        rows = [by_video[v][int(rng.integers(len(by_video[v])))] for v in videos[at:at + n]]
        at += n
      if len(rows) < n:
        raise ValueError(f"meta device {index}: its {len(pool)} labelled samples over "
                         f"{len(videos)} videos cannot fill the roles {dict(sizes)} from "
                         f"different videos; lower data.context_size or fda.meta_query_size")
      rows = [self._with_video(r) for r in rows]
      out[role] = {k: np.stack([r[k] for r in rows]) for k in rows[0]
                   if k not in ("video_index", "device_id")}
    return out

  def summary(self) -> dict:
    return dict(self.devices_builder.info.metadata["build_summary"])


def prepare(data_cfg, data_dir: str | None = None) -> FeatureBenchmark:
  bench = pipeline.prepare(data_cfg, data_dir, builders=(RealVideoCloud, RealVideoDevices))
  return FeatureBenchmark(cfg=bench.cfg, cloud=bench.cloud, devices_builder=bench.devices_builder)


def validate_data_config(cfg) -> None:
  """The data values a video task on a real dataset relies on (ConfigError names the key)."""
  d = cfg.data
  need(bool(d.manual_dir), "data.manual_dir", d.manual_dir,
       "name the folder holding the dataset's files.\n" + rv.INSTRUCTIONS)
  need(d.frames >= 2, "data.frames", d.frames, "need at least 2 frames: anchors carry the "
       "temporal difference between consecutive frames")
  for key in ("data.feature_dim", "data.num_meta_devices", "data.support_size",
              "data.oracle_size", "data.vocab_size"):
    positive(cfg, key)
  need(d.num_ood_devices == 0, "data.num_ood_devices", d.num_ood_devices,
       "a real video dataset has no out-of-distribution device group; set it to 0")
  need(cfg.model.get("frame_encoder_kind") == "projection", "model.frame_encoder_kind",
       cfg.model.get("frame_encoder_kind"), "real video datasets give frame features: use "
       "'projection' (a linear projection of the features)")
  # Every device's roles fit its data (no feature is read; MSVD's k-means reads them once).
  src = source(d)
  for split in DEVICE_SPLITS:
    for dev in src.roles[split]:
      try:
        src.eval_rows(split, dev)
      except rv.vf.VideoDataError as e:
        need(False, "data", f"{split} device {dev}", str(e))
