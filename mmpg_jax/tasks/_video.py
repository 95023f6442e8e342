"""Pieces shared by the video tasks: frame elements."""
import jax.numpy as jnp


def frame_elements(frames):
  """[n, T, D] frame embeddings -> [n*(T-1), 2D] elements [e_t, e_{t+1} - e_t]: a frame with
  its temporal difference, so an anchor carries motion (a single frame shows none)."""
  e, nxt = frames[:, :-1], frames[:, 1:]
  el = jnp.concatenate([e, nxt - e], axis=-1)
  return el.reshape((-1, el.shape[-1]))
