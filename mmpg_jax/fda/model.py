"""FDA: the Fast Domain Adaptor, the cloud hypernetwork that maps anchors to an edit.

Per modality of the upload (video frame elements; caption codes; ...) a set encoder, then:

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
The label-prior parts (aux head, EM, the bias residual) exist only for tasks with label groups.
`generate(fda, fda_params, upload) -> edit` is pure; `jax.vmap` it over devices.

Anchors with weight 0 are ignored exactly (masked out of the pooling and the EM), so a padded
set [N, E] with zero weights gives the same edit as the K live anchors alone.
"""

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax import params as P
from mmpg_jax.upload import Upload


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
  modalities: tuple                   # ((name, anchor dim), ...): the upload's anchor sets
  label_groups: tuple = ()            # ((start, stop), ...) label ids of each label group
  source_prior: tuple = ()            # the cloud's label prior (with label groups)
  prior_bias_leaf: str | None = None  # the leaf the label-shift residual edits
  summary_dim: int = 0                # floats of the device's summary in the upload (0: none)
  hidden: int = 128
  code_dim: int = 128
  num_queries: int = 4
  layer_dim: int = 64
  rank: int = 2
  full_delta_max: int = 256           # leaves with at most this many entries get a full delta
  em_iterations: int = 10

  def _encode_set(self, anchors, weights, prefix):
    """Per-anchor MLP, then attention pooling with learned queries (log-weights as a prior on
    attention). Returns (per-anchor features [K, H], pooled [M*H]). The primary modality's
    layers keep unprefixed names (and creation order), so a one-modality FDA is unchanged."""
    live = weights > 0
    h = nn.LayerNorm(name=f"{prefix}in_norm")(anchors)
    h = nn.relu(nn.Dense(self.hidden, name=f"{prefix}phi1")(h))
    h = nn.relu(nn.Dense(self.hidden, name=f"{prefix}phi2")(h))    # [K, H]
    return h, live

  def _pool(self, h, live, weights, prefix):
    queries = self.param(f"{prefix}queries", nn.initializers.normal(0.02),
                         (self.num_queries, self.hidden))
    keys = nn.Dense(self.hidden, name=f"{prefix}key")(h)
    logits = queries @ keys.T / np.sqrt(self.hidden) + jnp.log(jnp.where(live, weights, 1.0))
    logits = jnp.where(live[None, :], logits, -1e30)
    attn = jax.nn.softmax(logits, -1)                            # [M, K]
    return (attn @ h).reshape(-1)

  @nn.compact
  def __call__(self, upload):
    """upload: an `Upload` (anchors {modality: [K, E]}, weights {modality: [K]}, summary [S]).
    Returns (edit, aux); aux has the domain code z and, for tasks with label groups, the
    per-anchor label logits and the anchor EM's prior ratio.

    `summary` is the device's own forward-only statistic (for label-group tasks its EM
    estimate of log(target / source) label prior, `device.label_shift_ratio`)."""
    parts, aux, ratio = [], {}, None
    for i, (mod, _) in enumerate(self.modalities):
      prefix = "" if i == 0 else f"{mod}_"
      weights = upload.weights[mod]
      h, live = self._encode_set(upload.anchors[mod], weights, prefix)
      if i == 0 and self.label_groups:
        num_labels = len(self.source_prior)
        aux_logits = nn.Dense(num_labels, name="aux")(h)           # [K, A]
        src = jnp.asarray(self.source_prior, jnp.float32)
        ratio = jnp.zeros(num_labels)
        for lo, hi in self.label_groups:
          s = src[lo:hi] / src[lo:hi].sum()
          post = jax.nn.softmax(aux_logits[:, lo:hi], -1)
          prior = weighted_em(post, weights, s, self.em_iterations)
          ratio = ratio.at[lo:hi].set(jnp.log(prior) - jnp.log(s))
        aux = {"aux_logits": aux_logits, "prior_ratio": ratio}
      parts.append(self._pool(h, live, weights, prefix))
    if ratio is not None:
      parts.append(ratio)
    summary = None
    if self.summary_dim:
      summary = upload.summary
      if summary is None:
        summary = jnp.zeros(self.summary_dim)
      parts.append(summary)
    z = nn.relu(nn.Dense(self.code_dim, name="code")(jnp.concatenate(parts)))
    aux["code"] = z                                   # the device's domain code (diagnosis)

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
          if path == self.prior_bias_leaf and ratio is not None:
            # A learned residual on the closed-form label-shift corrections.
            alpha = self.param("prior_scale", nn.initializers.zeros, (size,))
            beta = self.param("device_prior_scale", nn.initializers.zeros, (size,))
            delta = delta + alpha * ratio + beta * (summary if summary is not None else 0.0)
          edit[path] = delta
        else:
          rows, cols = size // shape[-1], shape[-1]
          a = nn.Dense(rows * self.rank, kernel_init=nn.initializers.normal(0.02),
                       name=f"{name}__a")(e).reshape(rows, self.rank)
          b = nn.Dense(cols * self.rank, kernel_init=nn.initializers.zeros,
                       name=f"{name}__b")(e).reshape(self.rank, cols)
          edit[path] = P.LowRankDelta(a, b)
    return P.unflatten(edit), aux

  def upload_spec(self) -> dict:
    """What an upload must hold: anchor dims per modality and the summary's length."""
    return {"anchors": dict(self.modalities), "summary": self.summary_dim}


def from_config(config, task, device_params, source_prior, anchor_dims: dict) -> FDA:
  """The FDA for a task's device model and an experiment config (config.fda). `anchor_dims`:
  {modality: dim} of the task's anchor elements (primary modality first)."""
  _, dynamic = P.split(device_params, config.dynamic_leaves)
  fc = config.fda
  groups = tuple(task.label_groups) if source_prior is not None else ()
  summary_dim = len(source_prior) if groups else 0   # the device's label-shift estimate
  return FDA(
      spec=layer_spec(dynamic, fc.edit_leaves), modalities=tuple(anchor_dims.items()),
      label_groups=groups,
      source_prior=tuple(float(x) for x in source_prior) if groups else (),
      prior_bias_leaf=task.label_bias_leaf if groups else None, summary_dim=summary_dim,
      hidden=fc.hidden, code_dim=fc.code_dim, num_queries=fc.num_queries,
      layer_dim=fc.layer_dim, rank=fc.rank, full_delta_max=fc.full_delta_max,
      em_iterations=fc.em_iterations)


def generate(fda: FDA, fda_params, upload):
  """One device's upload -> its edit (the delta tree). Pure: vmap over devices."""
  return fda.apply({"params": fda_params}, upload)[0]


def example_upload(fda: FDA, k: int = 4) -> Upload:
  """An upload of k anchors per modality (zeros, equal weights) and a zero summary."""
  return Upload({m: jnp.zeros((k, d)) for m, d in fda.modalities},
                {m: jnp.full((k,), 1.0 / k) for m, _ in fda.modalities},
                jnp.zeros(fda.summary_dim) if fda.summary_dim else None)


def edit_shape(fda: FDA, fda_params, k: int = 4):
  """The edit pytree's shapes (ShapeDtypeStructs) for uploads of k anchors per modality."""
  return jax.eval_shape(lambda p: generate(fda, p, example_upload(fda, k)), fda_params)


def init(fda: FDA, key, k: int = 4):
  return fda.init(key, example_upload(fda, k))["params"]


def edit_bytes(edit, dtype_bytes: int) -> int:
  """What the downlink carries: low-rank factors and full deltas at the comm dtype."""
  return int(sum(x.size for x in jax.tree.leaves(edit))) * dtype_bytes
