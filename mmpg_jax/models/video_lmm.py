"""The lightweight multi-modal video device models: QA and retrieval.

    video [.., T, H, W] uint8 --frame_encoder (CNN)--> frame embeddings [.., T, D]  (static)
    question tokens [.., L]   --question_encoder (GRU)--> question code [.., Dq]     (static)
    frame embeddings --temporal--> video vector [.., D]          (order-aware pooling)
    (video vector, question code) --fusion (FiLM)--> --answer_head--> logits [.., A]

On real video datasets (`frame_encoder_kind='projection'`) the frame encoder is a linear
projection of pre-extracted frame features, and a frame mask marks the frames of videos
shorter than T (temporal pooling ignores the rest).

The encoders are static by default and the rest dynamic (config `dynamic_leaves`). Because
the expensive frame encoder is static, device-side adaptation can run on cached frame
embeddings: `answer_from_features(frame_emb, q_code)` is the dynamic part alone.

`VideoRetrieval` shares the frame encoder, the text (GRU) encoder and the temporal pooling, and
replaces fusion + answer head by two projection heads into a joint space (cosine similarity
with a learned temperature).

Temporal pooling is mean + max + a centred linear (slope) weighting over time: mean and max
are order-blind and cannot tell "up" from "down"; the slope term can.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class FrameEncoder(nn.Module):
  channels: Sequence[int] = (16, 32, 32)
  embed_dim: int = 64

  @nn.compact
  def __call__(self, frames):                      # [..., H, W] uint8
    lead = frames.shape[:-2]
    x = frames.reshape((-1,) + frames.shape[-2:] + (1,)).astype(jnp.float32) / 255.0
    for i, c in enumerate(self.channels):
      x = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2), name=f"conv{i}")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.embed_dim, name="proj")(x)
    return x.reshape(lead + (self.embed_dim,))


class FeatureProjection(nn.Module):
  """The frame encoder of real video datasets: a linear projection of given (pre-extracted,
  e.g. CLIP) frame features [..., T, F] -> [..., T, D] (config model.frame_encoder)."""
  embed_dim: int = 64

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.embed_dim, name="proj")(features.astype(jnp.float32))


def frame_encoder(kind: str, channels, embed_dim: int) -> nn.Module:
  if kind == "cnn":
    return FrameEncoder(tuple(channels), embed_dim)
  if kind == "projection":
    return FeatureProjection(embed_dim)
  raise ValueError(f"model.frame_encoder={kind!r}: use 'cnn' (pixels) or 'projection' "
                   f"(pre-extracted frame features)")


class QuestionEncoder(nn.Module):
  vocab_size: int
  dim: int = 32

  @nn.compact
  def __call__(self, tokens):                      # [..., L] int, 0 = pad
    lead = tokens.shape[:-1]
    tok = tokens.reshape((-1, tokens.shape[-1]))
    x = nn.Embed(self.vocab_size, self.dim, name="embed")(tok)
    lengths = jnp.maximum((tok > 0).sum(-1), 1)
    h = nn.RNN(nn.GRUCell(self.dim), name="gru")(x, seq_lengths=lengths)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last.reshape(lead + (self.dim,))


class TemporalPool(nn.Module):
  dim: int = 64

  @nn.compact
  def __call__(self, frame_emb, mask=None):        # [..., T, D]; mask [..., T] (1 = frame)
    h = nn.relu(nn.Dense(self.dim, name="frame")(frame_emb))
    t = h.shape[-2]
    if mask is None:
      w = jnp.arange(t, dtype=h.dtype) - (t - 1) / 2.0
      w = w / jnp.maximum(jnp.abs(w).sum(), 1.0)
      slope = jnp.einsum("...td,t->...d", h, w)
      pooled = jnp.concatenate([h.mean(-2), h.max(-2), slope], axis=-1)
    else:
      # padded frames (a video shorter than T) take no part: mean, max and slope over its
      # own n frames, the slope centred on its own middle
      m = mask.astype(h.dtype)[..., None]
      n = jnp.maximum(m.sum(-2), 1.0)
      w = (jnp.arange(t, dtype=h.dtype)[:, None] - (n[..., None, :] - 1) / 2.0) * m
      w = w / jnp.maximum(jnp.abs(w).sum(-2, keepdims=True), 1.0)
      pooled = jnp.concatenate([(h * m).sum(-2) / n, jnp.where(m > 0, h, -jnp.inf).max(-2),
                                (h * w).sum(-2)], axis=-1)
    return nn.Dense(self.dim, name="out")(pooled)


class FiLMFusion(nn.Module):
  @nn.compact
  def __call__(self, video, q):
    d = video.shape[-1]
    gamma_beta = nn.Dense(2 * d, name="film")(q)
    gamma, beta = jnp.split(gamma_beta, 2, axis=-1)
    v = nn.LayerNorm(name="norm")(video)
    return nn.relu(v * (1.0 + gamma) + beta)


class MLPHead(nn.Module):
  """LayerNorm -> Dense -> ReLU -> Dense: the answer head, and each side of the joint space.
  `features` is the input of the last (linear) layer `out`: what classifier-adjusting
  test-time methods (T3A, LAME) read."""
  out_dim: int
  hidden: int = 128

  def setup(self):
    self.norm = nn.LayerNorm()
    self.hidden_layer = nn.Dense(self.hidden, name="hidden")
    self.out = nn.Dense(self.out_dim)

  def features(self, x):
    return nn.relu(self.hidden_layer(self.norm(x)))

  def __call__(self, x):
    return self.out(self.features(x))


def _unit(x):
  return x / jnp.sqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))


class VideoLMM(nn.Module):
  num_answers: int
  vocab_size: int
  frame_channels: Sequence[int] = (16, 32, 32)
  embed_dim: int = 64
  question_dim: int = 32
  head_hidden: int = 128
  frame_encoder_kind: str = "cnn"     # config model.frame_encoder: 'cnn' | 'projection'

  def setup(self):
    self.frame_encoder = frame_encoder(self.frame_encoder_kind, self.frame_channels,
                                       self.embed_dim)
    self.question_encoder = QuestionEncoder(self.vocab_size, self.question_dim)
    self.temporal = TemporalPool(self.embed_dim)
    self.fusion = FiLMFusion()
    self.answer_head = MLPHead(self.num_answers, self.head_hidden)

  def encode_frames(self, video):
    return self.frame_encoder(video)

  def encode_question(self, tokens):
    return self.question_encoder(tokens)

  def answer_from_features(self, frame_emb, q_code, mask=None):
    return self.answer_head(self.fusion(self.temporal(frame_emb, mask), q_code))

  def answers_for_questions(self, frame_emb, q_codes, mask=None):
    """Every question of q_codes [Q, Dq] asked of each video frame_emb [n, T, D]: logits
    [n, Q, A]. The question-free temporal pooling runs once per video, not once per pair."""
    video = self.temporal(frame_emb, mask)[:, None]                # [n, 1, D]
    video = jnp.broadcast_to(video, video.shape[:1] + q_codes.shape[:1] + video.shape[2:])
    return self.answer_head(self.fusion(video, jnp.broadcast_to(q_codes, video.shape[:2]
                                                                + q_codes.shape[1:])))

  def fused_features(self, frame_emb, q_code, mask=None):
    """The fusion's output: the answer head's input (FOA reads its statistics)."""
    return self.fusion(self.temporal(frame_emb, mask), q_code)

  def answer_head_features(self, frame_emb, q_code, mask=None):
    """The input of the answer head's last layer (logits = it @ out/kernel + out/bias)."""
    return self.answer_head.features(self.fusion(self.temporal(frame_emb, mask), q_code))

  def __call__(self, video, question):
    return self.answer_from_features(self.encode_frames(video), self.encode_question(question))


class VideoRetrieval(nn.Module):
  """Text-to-video retrieval: similarity = exp(logit_scale) * cos(video, text)."""
  vocab_size: int
  frame_channels: Sequence[int] = (16, 32, 32)
  embed_dim: int = 64
  text_dim: int = 32
  joint_dim: int = 64
  head_hidden: int = 128
  init_temperature: float = 0.07
  frame_encoder_kind: str = "cnn"

  def setup(self):
    self.frame_encoder = frame_encoder(self.frame_encoder_kind, self.frame_channels,
                                       self.embed_dim)
    self.text_encoder = QuestionEncoder(self.vocab_size, self.text_dim)
    self.temporal = TemporalPool(self.embed_dim)
    self.video_head = MLPHead(self.joint_dim, self.head_hidden)
    self.text_head = MLPHead(self.joint_dim, self.head_hidden)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(
        float(np.log(1.0 / self.init_temperature))), ())

  def encode_frames(self, video):
    return self.frame_encoder(video)

  def encode_text(self, tokens):
    return self.text_encoder(tokens)

  def video_embedding(self, frame_emb, mask=None):   # [..., T, D] -> [..., J], unit norm
    return _unit(self.video_head(self.temporal(frame_emb, mask)))

  def text_embedding(self, text_code):           # [..., Dt] -> [..., J], unit norm
    return _unit(self.text_head(text_code))

  def similarity_from_features(self, frame_emb, text_code, mask=None):
    """Frame embeddings of n videos [n, T, D], codes of m texts [m, Dt] -> logits [m, n]."""
    v, t = self.video_embedding(frame_emb, mask), self.text_embedding(text_code)
    return jnp.exp(jnp.minimum(self.logit_scale, np.log(100.0))) * t @ v.T

  def __call__(self, video, caption):
    return self.similarity_from_features(self.encode_frames(video), self.encode_text(caption))
