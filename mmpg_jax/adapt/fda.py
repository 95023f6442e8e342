"""FDA: the Fast Domain Adaptor, the cloud hypernetwork that maps anchors to an edit.

    anchors [K, E] + weights [K]
      -> per-anchor MLP (LayerNorm, 2 x Dense)                        phi_k
      -> aux head: per-anchor answer posteriors (one softmax per question type's answers)
      -> weighted EM (Saerens) over those posteriors: the device's answer prior pi_t, and
         r = log pi_t - log pi_s, the log prior ratio against the cloud's source prior
      -> attention pooling with learned queries, logits + log w_k      (permutation invariant)
      -> domain code z = Dense([pooled, r, r_dev]), r_dev the device's own EM estimate of the
         same log ratio from its videos (forward passes only; 14 floats uploaded with anchors)
      -> GRU across the edited layers (cross-layer knowledge transfer): one code e_n per layer
      -> per leaf: low-rank factors (a, b) for kernels, a full delta for small leaves; the last
         factor / full delta is zero-initialised, so a fresh FDA's edit is exactly zero
      -> the answer-bias leaf also gets alpha * r + beta * r_dev (alpha, beta zero-initialised):
         the edit is a learned residual on top of the closed-form label-shift correction.
`generate(fda, fda_params, anchors, weights) -> edit` is pure; `jax.vmap` it over devices.

Anchors with weight 0 are ignored exactly (masked out of the pooling and the EM), so a padded
set [N, E] with zero weights gives the same edit as the K live anchors alone.
"""

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax import params as P
from mmpg_jax.data import moving_digits as md


def layer_spec(dynamic_params, edit_leaves):
  """((layer, ((path, shape), ...)), ...) in the device model's own (forward) order."""
  chosen = set(P.select(dynamic_params, edit_leaves))
  flat = traverse_util.flatten_dict(dynamic_params, sep="/")   # insertion (forward) order
  layers = {}
  for path, leaf in flat.items():
    if path in chosen:
      layer = path.rsplit("/", 1)[0]
      layers.setdefault(layer, []).append((path, tuple(leaf.shape)))
  return tuple((layer, tuple(leaves)) for layer, leaves in layers.items())


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


class FDA(nn.Module):
  spec: tuple                         # layer_spec(...)
  answer_groups: tuple                # ((start, stop), ...) answer ids of each question type
  source_prior: tuple                 # the cloud's answer prior, len = num answers
  prior_bias_leaf: str = "answer_head/out/bias"
  hidden: int = 128
  code_dim: int = 128
  num_queries: int = 4
  layer_dim: int = 64
  rank: int = 2
  full_delta_max: int = 256           # leaves with at most this many entries get a full delta
  em_iterations: int = 10

  @nn.compact
  def __call__(self, anchors, weights, device_ratio=None):
    """Returns (edit, aux) where aux has the per-anchor answer logits and the prior ratio.

    `device_ratio` [A] (optional) is the device's own forward-only EM estimate of
    log(target / source) answer prior (`device.label_shift_ratio`), uploaded with the anchors.
    """
    live = weights > 0
    h = nn.LayerNorm(name="in_norm")(anchors)
    h = nn.relu(nn.Dense(self.hidden, name="phi1")(h))
    h = nn.relu(nn.Dense(self.hidden, name="phi2")(h))           # [K, H]

    num_answers = len(self.source_prior)
    aux_logits = nn.Dense(num_answers, name="aux")(h)            # [K, A]
    src = jnp.asarray(self.source_prior, jnp.float32)
    ratio = jnp.zeros(num_answers)
    for lo, hi in self.answer_groups:
      s = src[lo:hi] / src[lo:hi].sum()
      post = jax.nn.softmax(aux_logits[:, lo:hi], -1)
      prior = weighted_em(post, weights, s, self.em_iterations)
      ratio = ratio.at[lo:hi].set(jnp.log(prior) - jnp.log(s))

    # Attention pooling: learned queries over the anchors, log-weights as a prior on attention.
    queries = self.param("queries", nn.initializers.normal(0.02), (self.num_queries, self.hidden))
    keys = nn.Dense(self.hidden, name="key")(h)
    logits = queries @ keys.T / np.sqrt(self.hidden) + jnp.log(jnp.where(live, weights, 1.0))
    logits = jnp.where(live[None, :], logits, -1e30)
    attn = jax.nn.softmax(logits, -1)                            # [M, K]
    pooled = (attn @ h).reshape(-1)
    if device_ratio is None:
      device_ratio = jnp.zeros(num_answers)
    z = nn.relu(nn.Dense(self.code_dim, name="code")(
        jnp.concatenate([pooled, ratio, device_ratio])))

    # Cross-layer knowledge transfer: a GRU walks the edited layers in forward order.
    cell = nn.GRUCell(self.layer_dim, name="layer_gru")
    layer_emb = self.param("layer_emb", nn.initializers.normal(0.02),
                           (len(self.spec), self.layer_dim))
    carry = jnp.zeros(self.layer_dim)
    edit = {}
    for n, (layer, leaves) in enumerate(self.spec):
      carry, e = cell(carry, jnp.concatenate([z, layer_emb[n]]))
      for path, shape in leaves:
        size = int(np.prod(shape))
        name = path.replace("/", "__")
        if size <= self.full_delta_max or len(shape) < 2:
          delta = nn.Dense(size, kernel_init=nn.initializers.zeros, name=f"{name}__full")(e)
          delta = delta.reshape(shape)
          if path == self.prior_bias_leaf:
            alpha = self.param("prior_scale", nn.initializers.zeros, (size,))
            beta = self.param("device_prior_scale", nn.initializers.zeros, (size,))
            delta = delta + alpha * ratio + beta * device_ratio
          edit[path] = delta
        else:
          rows, cols = size // shape[-1], shape[-1]
          a = nn.Dense(rows * self.rank, kernel_init=nn.initializers.normal(0.02),
                       name=f"{name}__a")(e).reshape(rows, self.rank)
          b = nn.Dense(cols * self.rank, kernel_init=nn.initializers.zeros,
                       name=f"{name}__b")(e).reshape(self.rank, cols)
          edit[path] = P.LowRankDelta(a, b)
    return P.unflatten(edit), {"aux_logits": aux_logits, "prior_ratio": ratio}


def from_config(config, device_params, source_prior) -> FDA:
  """The FDA for a device model's parameters and an experiment config (config.fda)."""
  _, dynamic = P.split(device_params, config.dynamic_leaves)
  fc = config.fda
  return FDA(
      spec=layer_spec(dynamic, fc.edit_leaves), answer_groups=md.ANSWER_GROUPS,
      source_prior=tuple(float(x) for x in source_prior), prior_bias_leaf=fc.prior_bias_leaf,
      hidden=fc.hidden, code_dim=fc.code_dim, num_queries=fc.num_queries,
      layer_dim=fc.layer_dim, rank=fc.rank, full_delta_max=fc.full_delta_max,
      em_iterations=fc.em_iterations)


def generate(fda: FDA, fda_params, anchors, weights, device_ratio=None):
  """anchors [K, E], weights [K] (+ device_ratio [A]) -> edit (the delta tree). Pure: vmap
  over devices."""
  return fda.apply({"params": fda_params}, anchors, weights, device_ratio)[0]


def init(fda: FDA, key, anchor_dim: int, k: int = 4):
  return fda.init(key, jnp.zeros((k, anchor_dim)), jnp.full((k,), 1.0 / k))["params"]


def edit_bytes(edit, dtype_bytes: int) -> int:
  """What the downlink carries: low-rank factors and full deltas at the comm dtype."""
  return int(sum(x.size for x in jax.tree.leaves(edit))) * dtype_bytes
