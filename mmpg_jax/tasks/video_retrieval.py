"""Text-to-video retrieval on the moving-digits benchmark.

Device model: `models.video_lmm.VideoRetrieval` (static frame CNN and caption GRU; dynamic
temporal pooling, video and text projection heads into a joint space, learned temperature).
Per sample a role holds the frame embeddings `frames` [T, D] and the caption code `text` [Dt];
labelled roles also hold `content` (= digit * 4 + direction, what the caption says). Scores of
a role are the similarity logits of its captions against its videos, [n texts, n videos]: each
device's query role is its own gallery.

Captions repeat inside a gallery (a device sees many "seven moving left"), so a retrieved video
counts as a hit when its caption states the same content as the query's (the same digit and
direction; the phrasing aside). Ranks count the non-matching videos scored above the best
matching one: R@k = rank < k, median rank = median of rank + 1 over a device's queries.

Device shift reaches the text side: each device phrases its captions with its own mix of
templates (the cloud's captions are mostly two of them), and the OOD group with phrasings never
used in training. The unlabelled context holds the device's videos and its users' query texts
(not which video answers which), and both are anchor elements: video frame elements and
caption codes.

MSRVTT (data.name msrvtt_retrieval; data/real_video.py): the frame encoder projects
pre-extracted frame features (model.frame_encoder_kind='projection'), roles carry a
`frame_mask`, a caption's `content` is its video's number (a hit is the right video), and a
device's gallery is its query videos from the 1k-A test pairs.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax import models
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import real_video
from mmpg_jax.tasks import _video
from mmpg_jax.tasks.base import Metric, encode_roles
from mmpg_jax.tasks.capabilities import GalleryRanking, ScoredContext


def info_nce(logits, content):
  """Symmetric InfoNCE with every same-content item a positive: logits [n, n] (texts x
  videos of n pairs), content [n]."""
  same = (content[:, None] == content[None, :]).astype(logits.dtype)
  target = same / same.sum(-1, keepdims=True)
  t2v = -(target * jax.nn.log_softmax(logits, -1)).sum(-1).mean()
  v2t = -(target.T * jax.nn.log_softmax(logits.T, -1)).sum(-1).mean()
  return 0.5 * (t2v + v2t)


def hit_ranks(scores, query_content, gallery_content):
  """For each query (row), how many non-matching gallery items score at least as high as its
  best match. Ties count against the query (every ranking metric of the codebase does so), so
  a constant scorer ranks every match last, not first; a non-finite match score ranks last."""
  same = query_content[:, None] == gallery_content[None, :]
  best = jnp.max(jnp.where(same, scores, -jnp.inf), axis=-1, keepdims=True)
  above = (scores >= best) | ~jnp.isfinite(best)
  return jnp.sum(above & ~same, axis=-1)


def retrieval_metrics(scores, query_content, gallery_content):
  rank = hit_ranks(scores, query_content, gallery_content)
  return {"r1": (rank < 1).mean(), "r5": (rank < 5).mean(), "r10": (rank < 10).mean(),
          "median_rank": jnp.median(rank + 1.0)}


class Task(_video.VideoTask, GalleryRanking, ScoredContext):
  name = "video_retrieval"
  datasets = ("moving_digits",) + real_video.RETRIEVAL_DATASETS
  metrics = (Metric("r1"), Metric("r5"), Metric("r10"), Metric("median_rank", higher_is_better=False, percent=False))
  text_len_key = "caption_len"
  encoder_prefixes = ("frame_encoder/", "text_encoder/")
  anchor_modalities = ("video", "text")

  def build_model(self):
    vocab = len(self.source().words) if self.features else len(md.CAPTION_VOCAB)
    return models.build(self.config.model, vocab_size=vocab)

  def example_labels(self, n):
    return {"content": jnp.arange(n, dtype=jnp.int32)}

  def encode(self, model, params, video, caption):
    """Static encoders: video [n,T,H,W] uint8, caption [n,L] -> {'frames', 'text'}."""
    frames = model.apply({"params": params}, video, method=model.encode_frames)
    text = model.apply({"params": params}, caption, method=model.encode_text)
    return {"frames": frames, "text": text}

  # ---- data ----------------------------------------------------------------------------------
  def encode_split(self, model, params, devices, chunk: int = 512):
    enc = jax.jit(lambda p, v, c: self.encode(model, p, v, c))
    return encode_roles(enc, params, devices, ("video", "caption"), ("content", "frame_mask"),
                        chunk)

  def global_loss(self, model, params, batch):
    """Symmetric InfoNCE over the batch's (video, caption) pairs, same content = positive."""
    feats = self.encode(model, params, batch["video"], batch["caption"])
    if "frame_mask" in batch:
      feats["frame_mask"] = batch["frame_mask"]
    scores = self.scores(model, params, feats)
    content = batch["content"]
    return info_nce(scores, content), {"r1": retrieval_metrics(scores, content, content)["r1"]}

  # ---- the device side -----------------------------------------------------------------------
  def scores(self, model, params, feats):
    return model.apply({"params": params}, feats["frames"], feats["text"],
                       feats.get("frame_mask"), method=model.similarity_from_features)

  def metric_values(self, scores, feats):
    return retrieval_metrics(scores, feats["content"], feats["content"])

  def loss(self, model, params, feats):
    return info_nce(self.scores(model, params, feats), feats["content"])

  def entropy(self, model, params, feats):
    """Entropy of each query text's softmax over the role's videos (the gallery)."""
    lp = jax.nn.log_softmax(self.scores(model, params, feats), -1)
    return -(jnp.exp(lp) * lp).sum(-1).mean()

  def training_queries(self, model, params, n: int, seed: int):
    """[n, Dt] the text codes of n of the cloud's own training captions (seeded draw without
    replacement from global_train): the query bank of querybank normalisation, encoded once in
    the cloud by the static text encoder."""
    src = self.prepare_data().global_source()
    if len(src) < n:
      raise ValueError(f"baselines.qb_norm.bank_size={n} exceeds the {len(src)} training "
                       "captions of global_train; lower it")
    idx = np.random.default_rng([seed, 31]).choice(len(src), n, replace=False)
    first = src[int(idx[0])]
    if "caption" not in first:
      raise ValueError("this dataset's training examples carry no tokenised caption; "
                       "querybank normalisation needs the cloud's training queries")
    captions = np.stack([np.asarray(src[int(i)]["caption"]) for i in idx])
    return model.apply({"params": params}, jnp.asarray(captions), method=model.encode_text)

  def gallery_scores(self, model, params, text, dev):
    """Text codes [n, Dt] against the device's gallery (its query videos): [n, n_gallery]."""
    gallery = dev[self.query_role]
    return model.apply({"params": params}, gallery["frames"], text, gallery.get("frame_mask"),
                       method=model.similarity_from_features)

  def anchor_elements(self, context):
    return {"video": _video.frame_elements(context["frames"], context.get("frame_mask")),
            "text": context["text"]}

  def anchor_info(self, cfg):
    d = cfg.data
    return {"frames_in_context": d.context_size * d.frames,
            "frame_elements": d.context_size * (d.frames - 1), "texts_in_context": d.context_size}

  # ---- meta-training -------------------------------------------------------------------------
  def encode_meta(self, model, params, raw):
    out = {}
    for role in ("context", "query"):
      out[role] = self.encode(model, params, raw[role]["video"], raw[role]["caption"])
      if "frame_mask" in raw[role]:
        out[role]["frame_mask"] = raw[role]["frame_mask"]
    out["query"]["content"] = raw["query"]["content"]
    return out

  def meta_loss(self, model, params, query):
    scores = self.scores(model, params, query)
    return (info_nce(scores, query["content"]),
            retrieval_metrics(scores, query["content"], query["content"])["r1"])

  def report_notes(self, cfg):
    if self.features:
      return [self.source().describe() + " Retrieval inside each device's own gallery (its "
              f"query videos from the 1k-A test pairs, {cfg.data.query_size} per device, one "
              "caption each): a hit is the caption's own video. median_rank is the mean over "
              "devices of each device's median rank (lower is better)."]
    return ["Text-to-video retrieval inside each device's own gallery (its query videos, "
            f"{cfg.data.query_size} per device): a retrieved video is a hit when its caption "
            "states the same content as the query's (the same digit and direction; the phrasing "
            "aside), since captions repeat inside a gallery. median_rank is the mean over "
            "devices of each device's median rank (lower is better)."]
