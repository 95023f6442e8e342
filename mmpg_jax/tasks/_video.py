"""Pieces shared by the video tasks: frame elements, and which data a video task reads."""
import jax.numpy as jnp

from mmpg_jax.data import real_video


def frame_elements(frames, mask=None):
  """[n, T, D] frame embeddings -> [n*(T-1), 2D] elements [e_t, e_{t+1} - e_t]: a frame with
  its temporal difference, so an anchor carries motion (a single frame shows none).

  With a frame mask [n, T] (real videos shorter than T), each video's padded frames repeat its
  last real frame first, so every element shows real content (the padded steps: the last frame,
  still) and the element count stays fixed."""
  if mask is not None:
    t = frames.shape[1]
    last = jnp.maximum(mask.sum(-1).astype(jnp.int32) - 1, 0)          # [n]
    idx = jnp.minimum(jnp.arange(t)[None, :], last[:, None])            # [n, T]
    frames = jnp.take_along_axis(frames, idx[..., None], axis=1)
  e, nxt = frames[:, :-1], frames[:, 1:]
  el = jnp.concatenate([e, nxt - e], axis=-1)
  return el.reshape((-1, el.shape[-1]))


def reads_features(config) -> bool:
  """True when the task's data are pre-extracted frame features of a real video dataset (the
  frame encoder is then a projection), False for the embedded moving-digits pixels."""
  return config.data.name in real_video.DATASETS
