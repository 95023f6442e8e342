"""The lightweight multi-modal video device models (DESIGN §3.1): QA and retrieval.

    video [.., T, H, W] uint8 --frame_encoder (CNN)--> frame embeddings [.., T, D]  (static)
    question tokens [.., L]   --question_encoder (GRU)--> question code [.., Dq]     (static)
    frame embeddings --temporal--> video vector [.., D]          (order-aware pooling)
    (video vector, question code) --fusion (FiLM)--> --answer_head--> logits [.., A]

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
  def __call__(self, frame_emb):                   # [..., T, D]
    h = nn.relu(nn.Dense(self.dim, name="frame")(frame_emb))
    t = h.shape[-2]
    w = jnp.arange(t, dtype=h.dtype) - (t - 1) / 2.0
    w = w / jnp.maximum(jnp.abs(w).sum(), 1.0)
    slope = jnp.einsum("...td,t->...d", h, w)
    pooled = jnp.concatenate([h.mean(-2), h.max(-2), slope], axis=-1)
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

  def setup(self):
    self.frame_encoder = FrameEncoder(tuple(self.frame_channels), self.embed_dim)
    self.question_encoder = QuestionEncoder(self.vocab_size, self.question_dim)
    self.temporal = TemporalPool(self.embed_dim)
    self.fusion = FiLMFusion()
    self.answer_head = MLPHead(self.num_answers, self.head_hidden)

  def encode_frames(self, video):
    return self.frame_encoder(video)

  def encode_question(self, tokens):
    return self.question_encoder(tokens)

  def answer_from_features(self, frame_emb, q_code):
    return self.answer_head(self.fusion(self.temporal(frame_emb), q_code))

  def answer_head_features(self, frame_emb, q_code):
    """The input of the answer head's last layer (logits = it @ out/kernel + out/bias)."""
    return self.answer_head.features(self.fusion(self.temporal(frame_emb), q_code))

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

  def setup(self):
    self.frame_encoder = FrameEncoder(tuple(self.frame_channels), self.embed_dim)
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

  def video_embedding(self, frame_emb):          # [..., T, D] -> [..., J], unit norm
    return _unit(self.video_head(self.temporal(frame_emb)))

  def text_embedding(self, text_code):           # [..., Dt] -> [..., J], unit norm
    return _unit(self.text_head(text_code))

  def similarity_from_features(self, frame_emb, text_code):
    """Frame embeddings of n videos [n, T, D], codes of m texts [m, Dt] -> logits [m, n]."""
    v, t = self.video_embedding(frame_emb), self.text_embedding(text_code)
    return jnp.exp(jnp.minimum(self.logit_scale, np.log(100.0))) * t @ v.T

  def __call__(self, video, caption):
    return self.similarity_from_features(self.encode_frames(video), self.encode_text(caption))
