"""A mixture of expert FDAs routed on the upload (the cdc_robust family's `routed`).

One FDA of the default size, meta-trained over wider shifts (`wide`), holds up better out of
distribution but gives up accuracy in distribution: it spreads over the wider shifts. Here two
experts keep their own ranges: the plain FDA (meta-trained on the training shifts) and the wide
one, both frozen. A small router in the cloud reads what the experts make of the upload (their
domain codes, and the device's summary) and weighs their edits:

    upload -> expert e: (edit_e, code_e)                 (each FDA's own forward pass)
    w = softmax(s x Router([code_1, ..., code_E, summary]))   (zero-initialised: equal weights;
                                                   s = 1 in training, a grid at evaluation)
    edit = sum_e w_e edit_e        a full delta is the weighted sum; a low-rank delta keeps
                                   every expert's factors side by side (rank E x r, exact)

The router alone is meta-trained (stage `router`), on meta devices of a mixture: a share
`cdc_robust.wide_mix_fraction` drawn from `wide_data`'s ranges, the rest from training's, so
that it learns which expert serves which kind of device. Its meta devices are fresh: neither
expert was meta-trained on them (as stacking fits its combiner out of fold). The device side
is plain cdc_mmpg's: the same upload, one merged edit down (with twice the low-rank factors),
forward passes only.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from mmpg_jax.core import params as P
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.training import meta_train

STAGE = "router"


class Router(nn.Module):
  num_experts: int
  hidden: int = 64

  @nn.compact
  def __call__(self, codes, summary=None):
    """codes [E, C] (the experts' domain codes), summary [S] or None -> logits [E]."""
    x = codes.reshape(-1)
    if summary is not None:
      x = jnp.concatenate([x, summary])
    h = nn.relu(nn.Dense(self.hidden, name="hidden")(nn.LayerNorm(name="in_norm")(x)))
    return nn.Dense(self.num_experts, kernel_init=nn.initializers.zeros, name="out")(h)


def mix_edits(edits, weights):
  """sum_e weights[e] x edits[e], leaf by leaf; low-rank factors are concatenated along the
  rank (exactly sum_e w_e a_e b_e), so nothing is materialised in the cloud."""
  def mix(*ds):
    if isinstance(ds[0], P.LowRankDelta):
      return P.LowRankDelta(jnp.concatenate([d.a * w for d, w in zip(ds, weights)], -1),
                            jnp.concatenate([d.b for d in ds], 0))
    return sum(d * w for d, w in zip(ds, weights))
  return jax.tree.map(mix, *edits, is_leaf=lambda x: isinstance(x, P.LowRankDelta))


def generate(fda, experts, router, router_params, upload, sharpness=1.0):
  """(edit, aux) of the routed mixture for one upload; aux['weights'] are the router's [E]
  (softmax of sharpness x its logits: 1 = as trained, larger = closer to top-1 routing).
  `experts`: the experts' FDA parameters, in the router's order (all of the same `fda`)."""
  outs = [fda.apply({"params": p}, upload) for p in experts]
  codes = jnp.stack([aux["code"] for _, aux in outs])
  summary = upload.summary
  if summary is None and fda.summary_dim:     # as the FDA reads a missing summary
    summary = jnp.zeros(fda.summary_dim)
  w = jax.nn.softmax(sharpness * router.apply({"params": router_params}, codes, summary))
  return mix_edits([e for e, _ in outs], w), {"weights": w}


def from_config(cfg, num_experts: int) -> Router:
  return Router(num_experts=num_experts, hidden=cfg.cdc_robust.router.hidden)


def init(router, fda, experts, key):
  up = fda_lib.example_upload(fda)
  codes = jnp.stack([fda.apply({"params": p}, up)[1]["code"] for p in experts])
  return router.init(key, codes, up.summary)["params"]


def stage_config(cfg) -> mlc.ConfigDict:
  """The router stage's config: config.fda's meta-training settings (anchor budgets, query
  size, optimiser) with `cdc_robust.router`'s own (its pool, steps, learning rate)."""
  sc = mlc.ConfigDict(cfg.fda.to_dict())
  sc.update({k: v for k, v in cfg.cdc_robust.router.to_dict().items() if k != "hidden"})
  return sc


def train(task, model, fda, experts, base_params, cfg, val_feats, workdir, metrics,
          summary=None, stage: str = STAGE):
  """Meta-trains (or resumes, or reloads) the router over the frozen experts on meta devices
  of `task` (the mixture); selected on validation devices. Returns (router, params, summary)."""
  sc = stage_config(cfg)
  router = from_config(cfg, len(experts))   # the experts stay frozen: only the router trains

  def episode(router_params, dev, k):
    edit, _ = generate(fda, experts, router, router_params,
                       fda_stage.episode_upload(task, dev, k))
    return task.meta_loss(model, P.apply_edit(base_params, edit, sc.clip), dev[task.query_role])

  def loss_fn(router_params, batch):
    loss, metric = jax.vmap(lambda d, k: episode(router_params, d, k))(batch["dev"], batch["k"])
    return loss.mean(), {"task_loss": loss.mean(),
                         f"query_{task.selection_metric.name}": metric.mean()}

  def make_batches():
    # Meta devices neither expert was meta-trained on (their ids start past the FDAs' pools):
    # on its own training devices an expert looks better than it generalises.
    pool = fda_stage.encode_meta_pool(task, model, base_params, sc, summary=summary,
                                      what=f"{stage} meta devices",
                                      first_id=cfg.fda.meta_devices,
                                      selector=cfg.adr.selector, workdir=workdir)
    return lambda step: fda_stage.episode_batch(pool, sc, cfg.seed, step)

  validate = meta_train.validator(task, model, val_feats, lambda rp, dev: P.apply_edit(
      base_params, generate(fda, experts, router, rp, round_trip.default_upload(
          task, base_params, dev, cfg, summary))[0], sc.clip))
  params, out = meta_train.train_selected(
      stage, init(router, fda, experts, jax.random.key(cfg.seed + 3)), sc, loss_fn=loss_fn,
      validate=validate, make_batches=make_batches, cfg=cfg, workdir=workdir, metrics=metrics,
      key="router_params", metric=task.selection_metric.name, config_key="cdc_robust.router",
      hint="Lower cdc_robust.router.learning_rate.")
  return router, params, out
