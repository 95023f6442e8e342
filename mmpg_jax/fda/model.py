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

Laid out for batched generation (thousands of devices per call), each piece one wide matmul:
  - the EM runs over every label group at once, on a padded [groups, answers] layout with a
    mask, not group by group;
  - the GRU's input is [z, layer_emb[n]], so its input projection is split: z's part is one
    matmul for all layers, the layer embeddings' part does not depend on the device at all;
    each step is one [D, 3D] matmul for the three gates;
  - a layer's heads (every piece of every leaf it edits) are one kernel, its output split;
  - attention pooling scores the anchors against the queries moved through the key
    projection (device-independent), not against every anchor's projected key.
The per-leaf layout (per_leaf.py) is the same network one module per piece: checkpoints
written before this layout load through `per_leaf.stack`, and the tests hold the two equal.
The pieces are methods (`encode`, `label_prior`, `domain_code`, `layer_codes`, `heads`,
`assemble`), so a benchmark can time each one (`bench --what=generate`).

Anchors with weight 0 are ignored exactly (masked out of the pooling and the EM), so a padded
set [N, E] with zero weights gives the same edit as the K live anchors alone.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmpg_jax.core import params as P
from mmpg_jax.core.upload import Upload
from mmpg_jax.fda import per_leaf


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


def _padded(x, groups, width: int, fill: float):
  """x [..., A] -> [..., G, W]: each group's labels, padded with `fill` to the widest group.
  Static slices and pads: the same values as a gather, which (vmapped) cost a CPU about five
  EM iterations."""
  pad = lambda v, n: jnp.pad(v, [(0, 0)] * (x.ndim - 1) + [(0, n)], constant_values=fill)
  return jnp.stack([pad(x[..., lo:hi], width - (hi - lo)) for lo, hi in groups], -2)


def grouped_em(logits, weights, source, groups, iterations: int):
  """Per label group, the EM label-shift prior (Saerens) from weighted per-anchor posteriors,
  every group at once. logits [K, A] over all labels; groups ((lo, hi), ...) each a softmax;
  source [A] the cloud's prior. Returns log(target prior / source prior) [A], each group's
  prior normalised within the group. Groups are padded to the widest and masked."""
  width = max(hi - lo for lo, hi in groups)
  mask = np.array([[j < hi - lo for j in range(width)] for lo, hi in groups])   # [G, W]
  s = _padded(source, groups, width, 0.0)
  s = s / s.sum(-1, keepdims=True)
  safe_s = jnp.where(mask, s, 1.0)
  post = jax.nn.softmax(_padded(logits, groups, width, -jnp.inf), -1)           # [K, G, W]
  w = weights / jnp.maximum(weights.sum(), 1e-12)
  prior = s
  for _ in range(iterations):
    q = post * (prior / safe_s)
    q = q / q.sum(-1, keepdims=True)
    prior = jnp.where(mask, jnp.maximum(jnp.einsum("k,kgw->gw", w, q), 1e-6), 0.0)
    prior = prior / prior.sum(-1, keepdims=True)
  ratio = jnp.log(jnp.where(mask, prior, 1.0)) - jnp.log(safe_s)                # [G, W]
  return jnp.concatenate([ratio[g, :hi - lo] for g, (lo, hi) in enumerate(groups)])


class DenseParams(nn.Module):
  """A Dense layer's parameters (kernel, bias), initialised as nn.Dense's, for a caller that
  uses them in another order than x @ kernel + bias."""
  features: int

  @nn.compact
  def __call__(self, in_features: int):
    return (self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features)),
            self.param("bias", nn.initializers.zeros, (self.features,)))


class SetEncoder(nn.Module):
  """One modality's anchors -> per-anchor features h [K, H] and their attention pooling
  [M * H] (learned queries; log-weights as a prior on attention; dead anchors masked)."""
  hidden: int
  num_queries: int

  @nn.compact
  def __call__(self, anchors, weights):
    live = weights > 0
    h = nn.LayerNorm(name="in_norm")(anchors)
    h = nn.relu(nn.Dense(self.hidden, name="phi1")(h))
    h = nn.relu(nn.Dense(self.hidden, name="phi2")(h))              # [K, H]
    queries = self.param("queries", nn.initializers.normal(0.02),
                         (self.num_queries, self.hidden))
    # queries @ (h W + b)^T without projecting every anchor: (queries W^T) h^T + queries b,
    # where queries W^T does not depend on the device (an [H, H] matmul per anchor saved).
    kernel, bias = DenseParams(self.hidden, name="key")(self.hidden)
    logits = (queries @ kernel.T) @ h.T + (queries @ bias)[:, None]
    logits = logits / np.sqrt(self.hidden) + jnp.log(jnp.where(live, weights, 1.0))
    logits = jnp.where(live[None, :], logits, -1e30)
    return h, (jax.nn.softmax(logits, -1) @ h).reshape(-1)


class LayerGRU(nn.Module):
  """A GRU (flax GRUCell's equations) over the edited layers, input [z, layer_emb[n]] at step
  n: its input projection computed once for all steps, one [D, 3D] matmul per step."""
  features: int

  @nn.compact
  def __call__(self, z, layer_emb):
    d = self.features
    wi = self.param("input_kernel", nn.initializers.lecun_normal(),
                    (z.shape[-1] + layer_emb.shape[-1], 3 * d))
    bi = self.param("input_bias", nn.initializers.zeros, (3 * d,))
    wh = self.param("hidden_kernel", nn.initializers.orthogonal(), (d, 3 * d))
    bh = self.param("hidden_bias", nn.initializers.zeros, (d,))
    z_in = z @ wi[:z.shape[-1]]                                       # the device's part
    layer_in = layer_emb @ wi[z.shape[-1]:] + bi                      # [L, 3D], device-free
    h, out = jnp.zeros(d), []
    for n in range(layer_emb.shape[0]):
      gi, gh = z_in + layer_in[n], h @ wh
      r = jax.nn.sigmoid(gi[:d] + gh[:d])
      u = jax.nn.sigmoid(gi[d:2 * d] + gh[d:2 * d])
      c = jnp.tanh(gi[2 * d:] + r * (gh[2 * d:] + bh))
      h = (1.0 - u) * c + u * h
      out.append(h)
    return jnp.stack(out)                                             # [L, D]


def _heads_init(pieces):
  """A layer's stacked head kernel: the low-rank 'a' columns random, the rest zero (so a
  fresh FDA's edit is exactly zero)."""
  def init(key, shape, dtype=jnp.float32):
    cols = [nn.initializers.normal(0.02)(k, (shape[0], width), dtype) if kind == "a"
            else jnp.zeros((shape[0], width), dtype)
            for k, (_, kind, width) in zip(jax.random.split(key, len(pieces)), pieces)]
    return jnp.concatenate(cols, -1)
  return init


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

  def setup(self):
    self.sets = [SetEncoder(self.hidden, self.num_queries) for _ in self.modalities]
    if self.label_groups:
      self.aux = nn.Dense(len(self.source_prior))
    if self._residual():
      self.prior_scale = self.param("prior_scale", nn.initializers.zeros,
                                    (len(self.source_prior),))
      self.device_prior_scale = self.param("device_prior_scale", nn.initializers.zeros,
                                           (len(self.source_prior),))
    self.code = nn.Dense(self.code_dim)
    self.layer_emb = self.param("layer_emb", nn.initializers.normal(0.02),
                                (len(self.spec), self.layer_dim))
    self.layer_gru = LayerGRU(self.layer_dim)
    self.pieces = [per_leaf.head_pieces(leaves, self.rank, self.full_delta_max)
                   for _, leaves in self.spec]
    self.layer_heads = [nn.Dense(sum(w for _, _, w in p), kernel_init=_heads_init(p))
                        for p in self.pieces]

  def _residual(self) -> bool:
    """Whether the label-shift residual edits a leaf (label groups, and the bias edited)."""
    return bool(self.label_groups) and any(
        path == self.prior_bias_leaf for _, leaves in self.spec for path, _ in leaves)

  # ---- the pieces, in order ----
  def encode(self, upload):
    """Each modality's set encoder: ([pooled per modality], per-anchor features of the
    primary modality)."""
    outs = [enc(upload.anchors[m], upload.weights[m])
            for enc, (m, _) in zip(self.sets, self.modalities)]
    return [pooled for _, pooled in outs], outs[0][0]

  def label_prior(self, h, weights):
    """(per-anchor label logits [K, A], the anchors' EM log prior ratio r [A])."""
    logits = self.aux(h)
    src = jnp.asarray(self.source_prior, jnp.float32)
    return logits, grouped_em(logits, weights, src, self.label_groups, self.em_iterations)

  def domain_code(self, pooled, ratio, summary):
    parts = list(pooled) + ([ratio] if ratio is not None else [])
    parts += [summary] if summary is not None else []
    return nn.relu(self.code(jnp.concatenate(parts)))

  def layer_codes(self, z):
    """Cross-layer knowledge transfer: the GRU walks the edited layers in forward order."""
    return self.layer_gru(z, self.layer_emb)

  def heads(self, e):
    """Each layer's stacked heads on its code e [L, D]: one output row per layer."""
    return [head(e[n]) for n, head in enumerate(self.layer_heads)]

  def assemble(self, outs, ratio, summary):
    """The heads' outputs split into the edit's leaves (+ the label-shift residual)."""
    edit = {}
    for pieces, out, (_, leaves) in zip(self.pieces, outs, self.spec):
      shapes, at, a = dict(leaves), 0, None
      for path, kind, width in pieces:
        x, at = out[at:at + width], at + width
        if kind == "full":
          x = x.reshape(shapes[path])
          if path == self.prior_bias_leaf and self._residual() and ratio is not None:
            # A learned residual on the closed-form label-shift corrections.
            x = x + self.prior_scale * ratio + self.device_prior_scale * (
                summary if summary is not None else 0.0)
          edit[path] = x
        elif kind == "a":
          a = x.reshape(-1, self.rank)
        else:
          edit[path] = P.LowRankDelta(a, x.reshape(self.rank, -1))
    return P.unflatten(edit)

  def summary_of(self, upload):
    if not self.summary_dim:
      return None
    return upload.summary if upload.summary is not None else jnp.zeros(self.summary_dim)

  def __call__(self, upload):
    """upload: an `Upload` (anchors {modality: [K, E]}, weights {modality: [K]}, summary [S]).
    Returns (edit, aux); aux has the domain code z and, for tasks with label groups, the
    per-anchor label logits and the anchor EM's prior ratio.

    `summary` is the device's own forward-only statistic (for label-group tasks its EM
    estimate of log(target / source) label prior, `device.label_shift_ratio`)."""
    pooled, h = self.encode(upload)
    aux, ratio = {}, None
    if self.label_groups:
      logits, ratio = self.label_prior(h, upload.weights[self.modalities[0][0]])
      aux = {"aux_logits": logits, "prior_ratio": ratio}
    summary = self.summary_of(upload)
    z = self.domain_code(pooled, ratio, summary)
    aux["code"] = z                                   # the device's domain code (diagnosis)
    return self.assemble(self.heads(self.layer_codes(z)), ratio, summary), aux

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
  """Starting parameters: drawn in the per-leaf layout and stacked, so a seed starts the same
  FDA whichever layout trains it (and runs from before the stacked layout reproduce)."""
  return per_leaf.stack(fda, per_leaf.module(fda).init(key, example_upload(fda, k))["params"])


def edit_bytes(edit, dtype_bytes: int) -> int:
  """What the downlink carries: low-rank factors and full deltas at the comm dtype."""
  return int(sum(x.size for x in jax.tree.leaves(edit))) * dtype_bytes
