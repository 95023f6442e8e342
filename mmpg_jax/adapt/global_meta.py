"""The data-matched control `global_meta`: the global model trained on the meta devices' data.

CDC-MMPG (and DUET, Persona) meta-train on thousands of labelled meta devices that the global
model never saw; every other rival adapts the global model. Whether a hypernetwork's gain comes
from reading the device or just from more data is answered by this row: the global model's
dynamic leaves (`config.dynamic_leaves`, the leaves an edit may change) trained with AdamW on
the labelled query samples of the same meta devices the FDA's loss reads (ids
0..meta_devices-1, `meta_query_size` each), the task's meta loss, one shared model for every
device. Training length is chosen on validation devices (evaluated every `eval_every` steps,
the best kept, as the FDA's), the learning rate by the evaluator over `learning_rates` (each
its own stage): the same selection budget as the hypernetwork's. The device downloads the
trained leaves once and then runs the model as it is: no labels, no backward passes, no upload.

The trained parameters are shared in `ctx.shared['global_meta']` ({learning rate: params})
and the validation-best under `ctx.shared['global_meta_selected']` ((rate, params)): the base
that `cdc_mmpg_on_global_meta` edits on top of.
"""
import jax
import ml_collections as mlc
from absl import logging

from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import need
from mmpg_jax.ondevice import costs
from mmpg_jax.training import meta_train
from mmpg_jax.training.methods import Method, Seen

STAGE = "global_meta"


def stage_name(lr) -> str:
  return f"{STAGE}_lr{lr:g}"


def meta_devices(cfg) -> int:
  """How many meta devices: the FDA's own pool size unless set (the data the FDA saw)."""
  gc = cfg.global_meta
  return int(gc.meta_devices or cfg.fda.meta_devices)


def validate_config(cfg, task, model, abstract_params) -> None:
  gc = cfg.get("global_meta")
  need(gc is not None, "global_meta", None,
       "a config.global_meta block (learning_rates, num_steps, ...): see configs/")
  need(len(gc.learning_rates) > 0 and all(float(x) > 0 for x in gc.learning_rates),
       "global_meta.learning_rates", tuple(gc.learning_rates), "a non-empty tuple of rates > 0")
  need(int(gc.num_steps) > 0 and int(gc.eval_every) > 0, "global_meta.num_steps",
       gc.num_steps, "> 0, with eval_every > 0")
  need(bool(gc.meta_devices) or "fda" in cfg, "global_meta.meta_devices", gc.meta_devices,
       "a number of meta devices (0 takes fda.meta_devices, but this config has no fda)")
  P.select(abstract_params, cfg.dynamic_leaves)      # fail early on a pattern matching nothing


def _stage_config(gc, lr):
  return mlc.ConfigDict(dict(
      learning_rate=float(lr), warmup_steps=int(gc.warmup_steps), num_steps=int(gc.num_steps),
      weight_decay=float(gc.weight_decay), grad_clip=float(gc.grad_clip),
      eval_every=int(gc.eval_every), log_every=int(gc.log_every),
      checkpoint_every=int(gc.checkpoint_every)))


def encode_queries(ctx):
  """The labelled queries of meta devices 0..n-1, encoded by the static encoders."""
  task, cfg = ctx.task, ctx.config
  # Only the labelled query of each meta device is read, but the whole device is encoded: the
  # run's stored pool of them is the FDA's (the same devices, role sizes and encoder), so the
  # FDAs read it rather than render the devices again.
  pool = meta_train.encode_devices(task, ctx.model, ctx.params, range(meta_devices(cfg)),
                                   cfg.fda.meta_query_size, what="global_meta meta devices",
                                   workdir=ctx.workdir)
  return pool[task.query_role]


def train(ctx, lr, queries):
  """Trains (or resumes, or reloads) the dynamic leaves at learning rate `lr` on `queries()`
  (called only if there is training left); returns the validation-selected parameters (the
  whole model) and the stage's summary."""
  task, model, cfg = ctx.task, ctx.model, ctx.config
  gc = cfg.global_meta
  static, dyn0 = P.split(ctx.params, cfg.dynamic_leaves)
  per_step = int(gc.devices_per_step)

  def loss_fn(dyn, batch):
    params = P.merge(static, dyn)
    loss, metric = jax.vmap(lambda q: task.meta_loss(model, params, q))(batch)
    return loss.mean(), {task.selection_metric.name: metric.mean()}

  def make_batches():
    query = queries()
    return lambda step: meta_train.pool_batch(query, per_step, cfg.seed, step, salt=11)

  validate = meta_train.validator(task, model, ctx.val, lambda dyn, dev: P.merge(static, dyn))
  dyn, summary = meta_train.train_selected(
      stage_name(lr), dyn0, _stage_config(gc, lr), loss_fn=loss_fn, validate=validate,
      make_batches=make_batches, cfg=cfg, workdir=ctx.workdir, metrics=ctx.metrics,
      key="params", metric=task.selection_metric.name, config_key="global_meta",
      hint="Lower global_meta.learning_rates.")
  return P.merge(static, dyn), summary


def build(ctx):
  """One stage per learning rate, then the row `global_meta` (the rate chosen on validation)."""
  cfg = ctx.config
  gc = cfg.global_meta
  trained, summaries, cache = {}, {}, {}

  def queries():                      # encoded once, for every rate, only if one trains
    if "q" not in cache:
      cache["q"] = encode_queries(ctx)
    return cache["q"]

  for lr in gc.learning_rates:
    trained[f"{float(lr):g}"], summaries[f"{float(lr):g}"] = train(ctx, float(lr), queries)
    logging.info("global_meta lr %g ready (%s)", lr, summaries[f"{float(lr):g}"])
  ctx.shared["global_meta"] = trained
  # The rate the evaluator will choose (the same mean selection metric on the same
  # validation devices): the base a later family's rows may edit on top of.
  metric = f"best_val_{ctx.task.selection_metric.name}"
  best = max(summaries, key=lambda k: summaries[k][metric])
  ctx.shared["global_meta_selected"] = (best, trained[best])
  ctx.extra["global_meta"] = {"meta_devices": meta_devices(cfg),
                              "query_samples_per_device": int(cfg.fda.meta_query_size),
                              "stages": summaries}
  _, dyn = P.split(ctx.params, cfg.dynamic_leaves)
  down = float(P.tree_size(dyn) * costs.dtype_bytes(cfg.comm_dtype))

  def adapt(params, dev, hp):
    del params, dev                 # one model for every device: the upload is not read
    return trained[hp["lr"]]

  def cost(hp):
    # the trained leaves, downloaded once; nothing computed on the device beyond inference
    return costs.DeviceCost(downlink_bytes=down)

  grid = tuple({"lr": k} for k in trained)     # a string: static, one compile per model
  return [Method("global_meta", grid, adapt, cost, uses=(), role="control",
                 seen=Seen(meta_devices=meta_devices(cfg), shifts="training",
                           note="data-matched: the global model's dynamic leaves trained on "
                                "the meta devices' labelled queries"))]
