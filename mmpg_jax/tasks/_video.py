"""Pieces shared by the video tasks: chunked encoding of device roles, and frame elements."""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.tasks.base import pad_to


def encode_roles(enc, params, devices: dict, inputs: tuple, keep: tuple,
                 chunk: int = 512) -> dict:
  """Runs the jitted static encoders `enc(params, *inputs)` over every role of a device split.

  `devices[role]` holds raw fields with leading axes [N devices, n samples]; `inputs` names the
  fields fed to the encoders, `keep` the raw fields copied unchanged (labels, question types).
  Samples are encoded in fixed-size chunks of `chunk` (padded), so every split compiles once."""
  out = {}
  for role, data in devices.items():
    if not isinstance(data, dict) or inputs[0] not in data:
      continue
    nd, n = data[inputs[0]].shape[:2]
    flat = [data[f].reshape((nd * n,) + data[f].shape[2:]) for f in inputs]
    parts = []
    for s in range(0, nd * n, chunk):
      xs = [x[s:s + chunk] for x in flat]
      f = enc(params, *[pad_to(x, chunk) for x in xs])
      parts.append(jax.tree.map(lambda x: np.asarray(x)[:len(xs[0])], f))
    feats = {k: np.concatenate([p[k] for p in parts]).reshape((nd, n) + parts[0][k].shape[1:])
             for k in parts[0]}
    for k in keep:
      if k in data:
        feats[k] = data[k]
    out[role] = feats
  out["device_id"] = np.asarray(devices["device_id"])
  return out


def frame_elements(frames):
  """[n, T, D] frame embeddings -> [n*(T-1), 2D] elements [e_t, e_{t+1} - e_t]: a frame with
  its temporal difference, so an anchor carries motion (a single frame shows none)."""
  e, nxt = frames[:, :-1], frames[:, 1:]
  el = jnp.concatenate([e, nxt - e], axis=-1)
  return el.reshape((-1, el.shape[-1]))
