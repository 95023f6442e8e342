"""Persona's and DUET's cloud networks and the adaptive layers they produce."""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import ConfigError


class WindowEncoder(nn.Module):
  """[n, E] window elements, in arrival order -> code [code_dim] (GRU, last state, MLP)."""
  hidden: int
  code_dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="norm")(x)
    h = nn.RNN(nn.GRUCell(self.hidden), name="gru")(x[None])[0, -1]
    return nn.Dense(self.code_dim, name="out")(jnp.tanh(nn.Dense(self.hidden, name="mlp")(h)))


class Heads(nn.Module):
  """Layer codes [N, d] -> ((kernel [in, out], bias [out]), ...): W = e A + a, b = e B + β."""
  shapes: tuple                      # ((in, out), ...) of the adaptive layers
  scale: float = 0.1                 # init std of A and B (x 1/sqrt(d)); a, β start at 0

  @nn.compact
  def __call__(self, e):
    out = []
    d = e.shape[-1]
    init = nn.initializers.normal(self.scale / np.sqrt(d))
    for n, (i, o) in enumerate(self.shapes):
      a_mat = self.param(f"A_{n}", init, (d, i * o))
      a_vec = self.param(f"a_{n}", nn.initializers.zeros, (i * o,))
      b_mat = self.param(f"B_{n}", init, (d, o))
      b_vec = self.param(f"b_{n}", nn.initializers.zeros, (o,))
      out.append(((e[n] @ a_mat + a_vec).reshape(i, o), e[n] @ b_mat + b_vec))
    return tuple(out)


class Generator(nn.Module):
  """DUET: one window code for every layer, heads give the layers outright."""
  shapes: tuple
  hidden: int
  code_dim: int
  scale: float = 0.1

  def setup(self):
    self.window = WindowEncoder(self.hidden, self.code_dim)
    self.heads = Heads(self.shapes, self.scale)

  def __call__(self, x):
    c = self.window(x)
    return self.heads(jnp.broadcast_to(c, (len(self.shapes),) + c.shape))


class Editor(nn.Module):
  """Persona's editor: window code -> GRU across layers -> layer codes -> heads -> edits."""
  shapes: tuple
  hidden: int
  code_dim: int
  scale: float = 0.1

  def setup(self):
    self.window = WindowEncoder(self.hidden, self.code_dim)
    self.cross = nn.GRUCell(self.code_dim)
    self.layer_out = [nn.Dense(self.code_dim) for _ in self.shapes]
    self.heads = Heads(self.shapes, self.scale)

  def codes(self, x):
    """[N, d] layer codes of a window (Stage B clusters their concatenation)."""
    c0 = self.window(x)
    h = jnp.zeros_like(c0)
    es = []
    for dense in self.layer_out:
      h, _ = self.cross(h, c0)
      es.append(jnp.tanh(dense(h)))
    return jnp.stack(es)

  def decode(self, e):
    return self.heads(e)

  def __call__(self, x):
    return self.decode(self.codes(x))


# ---- edits and their layers ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layers:
  paths: tuple                       # adaptive layer paths, forward order
  shapes: tuple                      # ((in, out), ...)

  def as_edit(self, layers) -> dict:
    """((kernel, bias), ...) -> an edit pytree naming `<path>/kernel` and `<path>/bias`."""
    flat = {}
    for path, (k, b) in zip(self.paths, layers):
      flat[f"{path}/kernel"], flat[f"{path}/bias"] = k, b
    return P.unflatten(flat)

  def floats(self) -> int:
    return int(sum(i * o + o for i, o in self.shapes))


def adaptive_layers(params, paths) -> Layers:
  flat = P.flatten(params)
  shapes = []
  for path in paths:
    k, b = flat.get(f"{path}/kernel"), flat.get(f"{path}/bias")
    if k is None or b is None or k.ndim != 2 or b.shape != k.shape[-1:]:
      raise ConfigError(
          f"config.persona.layers names {path!r}, which is not a Dense layer of the device "
          f"model (it needs {path}/kernel [in, out] and {path}/bias [out]); Dense layers: "
          + ", ".join(sorted({p.rsplit('/', 1)[0] for p in flat if p.endswith('/kernel')
                              and flat[p].ndim == 2})))
    shapes.append(tuple(int(s) for s in k.shape))
  return Layers(tuple(paths), tuple(shapes))


def clip_layers(layers, eps):
  return tuple((jnp.clip(k, -eps, eps), jnp.clip(b, -eps, eps)) for k, b in layers)


def add_layers(a, b):
  return tuple((ka + kb, ba + bb) for (ka, ba), (kb, bb) in zip(a, b))


def edit_norm(layers):
  return jnp.sqrt(sum((k * k).sum() + (b * b).sum() for k, b in layers))


# ---- the dynamic refinement (pure, jittable; k-means is mmpg_jax/kmeans.py) -------------------
