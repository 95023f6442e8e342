"""The FDA's per-leaf layout: how checkpoints written before the stacked layout store it, and
the reference the stacked FDA (model.py) is tested against.

Same network as model.FDA, laid out one module per piece: a flax GRUCell (six gate Dense
layers) walks the layers, and every edited leaf has its own head(s) (`{leaf}__full`, or the
low-rank factors `{leaf}__a`, `{leaf}__b`); the EM runs group by group. `stack(fda, params)`
converts its parameters (or any tree shaped like them, e.g. an optimiser's moments) to the
stacked layout; `init` draws the stacked FDA's starting parameters through this layout, so a
seed gives the same starting FDA in both.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.core import params as P

GRU_GATES = ("r", "z", "n")   # flax GRUCell's gates, in the order the stacked kernels hold them


def head_pieces(leaves, rank: int, full_delta_max: int):
  """A layer's head outputs in order: ((path, kind, width), ...); kind 'full' (the whole
  delta), 'a' and 'b' (a kernel's low-rank factors, a [rows, rank] and b [rank, cols])."""
  out = []
  for path, shape in leaves:
    size = int(np.prod(shape))
    if size <= full_delta_max or len(shape) < 2:
      out.append((path, "full", size))
    else:
      out += [(path, "a", (size // shape[-1]) * rank), (path, "b", shape[-1] * rank)]
  return tuple(out)


def weighted_em(post, weights, source, iterations: int):
  """EM label-shift prior from weighted posteriors post [K, A] (one group's answers)."""
  w = weights / jnp.maximum(weights.sum(), 1e-12)
  prior = source
  for _ in range(iterations):
    q = post * (prior / source)
    q = q / q.sum(-1, keepdims=True)
    prior = jnp.maximum(w @ q, 1e-6)
    prior = prior / prior.sum()
  return prior


class PerLeafFDA(nn.Module):
  """model.FDA's fields; see there for the network."""
  spec: tuple
  modalities: tuple
  label_groups: tuple = ()
  source_prior: tuple = ()
  prior_bias_leaf: str | None = None
  summary_dim: int = 0
  hidden: int = 128
  code_dim: int = 128
  num_queries: int = 4
  layer_dim: int = 64
  rank: int = 2
  full_delta_max: int = 256
  em_iterations: int = 10

  @nn.compact
  def __call__(self, upload):
    parts, aux, ratio = [], {}, None
    for i, (mod, _) in enumerate(self.modalities):
      prefix = "" if i == 0 else f"{mod}_"
      weights = upload.weights[mod]
      live = weights > 0
      h = nn.LayerNorm(name=f"{prefix}in_norm")(upload.anchors[mod])
      h = nn.relu(nn.Dense(self.hidden, name=f"{prefix}phi1")(h))
      h = nn.relu(nn.Dense(self.hidden, name=f"{prefix}phi2")(h))
      if i == 0 and self.label_groups:
        num_labels = len(self.source_prior)
        aux_logits = nn.Dense(num_labels, name="aux")(h)
        src = jnp.asarray(self.source_prior, jnp.float32)
        ratio = jnp.zeros(num_labels)
        for lo, hi in self.label_groups:
          s = src[lo:hi] / src[lo:hi].sum()
          prior = weighted_em(jax.nn.softmax(aux_logits[:, lo:hi], -1), weights, s,
                              self.em_iterations)
          ratio = ratio.at[lo:hi].set(jnp.log(prior) - jnp.log(s))
        aux = {"aux_logits": aux_logits, "prior_ratio": ratio}
      queries = self.param(f"{prefix}queries", nn.initializers.normal(0.02),
                           (self.num_queries, self.hidden))
      keys = nn.Dense(self.hidden, name=f"{prefix}key")(h)
      logits = queries @ keys.T / np.sqrt(self.hidden) + jnp.log(jnp.where(live, weights, 1.0))
      logits = jnp.where(live[None, :], logits, -1e30)
      parts.append((jax.nn.softmax(logits, -1) @ h).reshape(-1))
    if ratio is not None:
      parts.append(ratio)
    summary = None
    if self.summary_dim:
      summary = upload.summary if upload.summary is not None else jnp.zeros(self.summary_dim)
      parts.append(summary)
    z = nn.relu(nn.Dense(self.code_dim, name="code")(jnp.concatenate(parts)))
    aux["code"] = z
    cell = nn.GRUCell(self.layer_dim, name="layer_gru")
    layer_emb = self.param("layer_emb", nn.initializers.normal(0.02),
                           (len(self.spec), self.layer_dim))
    carry = jnp.zeros(self.layer_dim)
    edit = {}
    for n, (layer, leaves) in enumerate(self.spec):
      carry, e = cell(carry, jnp.concatenate([z, layer_emb[n]]))
      for path, kind, width in head_pieces(leaves, self.rank, self.full_delta_max):
        name = f"{path.replace('/', '__')}__{kind}"
        shape = dict(leaves)[path]
        if kind == "full":
          delta = nn.Dense(width, kernel_init=nn.initializers.zeros, name=name)(e).reshape(shape)
          if path == self.prior_bias_leaf and ratio is not None:
            alpha = self.param("prior_scale", nn.initializers.zeros, (width,))
            beta = self.param("device_prior_scale", nn.initializers.zeros, (width,))
            delta = delta + alpha * ratio + beta * (summary if summary is not None else 0.0)
          edit[path] = delta
        elif kind == "a":
          a = nn.Dense(width, kernel_init=nn.initializers.normal(0.02), name=name)(e)
        else:
          b = nn.Dense(width, kernel_init=nn.initializers.zeros, name=name)(e)
          edit[path] = P.LowRankDelta(a.reshape(-1, self.rank), b.reshape(self.rank, -1))
    return P.unflatten(edit), aux


def module(fda) -> PerLeafFDA:
  """The per-leaf layout of a (stacked) model.FDA: the same fields."""
  return PerLeafFDA(**{f: getattr(fda, f) for f in PerLeafFDA.__dataclass_fields__
                       if f not in ("parent", "name")})


def is_per_leaf(tree) -> bool:
  """Whether an FDA parameter tree (or a tree shaped like one) is in the per-leaf layout."""
  return "layer_gru" in tree and "ir" in tree["layer_gru"]


def stack(fda, tree):
  """Per-leaf FDA parameters (or a tree shaped like them) -> the stacked layout of model.FDA:
  the set encoders under sets_<i>, the GRU's gate kernels side by side, and each layer's heads
  as one kernel whose columns are its pieces in `head_pieces` order."""
  tree = dict(tree)
  out = {}
  for i, (mod, _) in enumerate(fda.modalities):
    prefix = "" if i == 0 else f"{mod}_"
    out[f"sets_{i}"] = {n: tree.pop(prefix + n) for n in ("in_norm", "phi1", "phi2", "key",
                                                         "queries")}
  gru = tree.pop("layer_gru")
  cat = lambda names, part: jnp.concatenate([gru[n][part] for n in names], -1)
  out["layer_gru"] = {"input_kernel": cat(("ir", "iz", "in"), "kernel"),
                      "input_bias": cat(("ir", "iz", "in"), "bias"),
                      "hidden_kernel": cat(("hr", "hz", "hn"), "kernel"),
                      "hidden_bias": gru["hn"]["bias"]}
  for n, (_, leaves) in enumerate(fda.spec):
    heads = [tree.pop(f"{path.replace('/', '__')}__{kind}")
             for path, kind, _ in head_pieces(leaves, fda.rank, fda.full_delta_max)]
    out[f"layer_heads_{n}"] = {p: jnp.concatenate([h[p] for h in heads], -1)
                         for p in ("kernel", "bias")}
  out.update(tree)             # aux, code, layer_emb, prior_scale, device_prior_scale
  return out
