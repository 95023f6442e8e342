"""The persona family's meta-training stages: DUET's generator, Persona's editor, its
prototypes and prototype editors, over one pool of meta windows."""
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmpg_jax.adapt.persona.networks import (Editor, Generator, Layers, add_layers, clip_layers,
                                             edit_norm)
from mmpg_jax.adapt.persona.prototypes import history_centres
from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import ConfigError
from mmpg_jax.core.kmeans import kmeans
from mmpg_jax.training import meta_train


def _elements(task, dev):
  return task.anchor_elements(dev[task.context_role])[task.anchor_modalities[0]]


@dataclasses.dataclass
class Family:
  """Everything the persona family builds, shared by its methods and its tests."""
  ctx: Any
  layers: Layers
  generator: Generator
  editor: Editor
  base_layers: tuple

  @property
  def cfg(self):
    return self.ctx.config.persona

  # -- device-model parameters from each network's output
  def duet_params(self, gen_params, dev):
    out = self.generator.apply({"params": gen_params}, _elements(self.ctx.task, dev))
    return P.apply_edit(self.ctx.params, self.layers.as_edit(out), mode="replace")

  def single_params(self, ed_params, dev, eps=None):
    ed = self.editor.apply({"params": ed_params}, _elements(self.ctx.task, dev))
    eps = self.cfg.epsilon if eps is None else eps
    return P.apply_edit(self.ctx.params, self.layers.as_edit(clip_layers(ed, eps)))

  def example_elements(self):
    """A window's anchor elements (zeros): the networks' init input."""
    task, model, params = self.ctx.task, self.ctx.model, self.ctx.params
    n = self.ctx.config.data.context_size
    return task.anchor_elements(task.example_features(model, params, n))[
        task.anchor_modalities[0]]

  def codes(self, ed_params, dev):
    return self.editor.apply({"params": ed_params}, _elements(self.ctx.task, dev),
                             method=Editor.codes).reshape(-1)

  def proto_edit(self, ed_params, centre):
    return self.editor.apply({"params": ed_params},
                             centre.reshape(len(self.layers.shapes), -1), method=Editor.decode)

  def group_params(self, ed_params, group_params, centres, g, dev):
    """Prototype g's device parameters for a window: base + clip(proto + clip(sample))."""
    return self.params_at(ed_params, group_params, centres[g], g, dev)

  def params_at(self, ed_params, group_params, centre, g, dev):
    """As group_params, with prototype g's edit decoded from `centre` (a refined centre)."""
    sample = self.editor.apply({"params": jax.tree.map(lambda x: x[g], group_params)},
                               _elements(self.ctx.task, dev))
    total = add_layers(self.proto_edit(ed_params, centre),
                       clip_layers(sample, self.cfg.sample_epsilon))
    return P.apply_edit(self.ctx.params, self.layers.as_edit(clip_layers(total,
                                                                         self.cfg.epsilon)))

  def assign(self, ed_params, group_params, centres, dev, rule):
    code = self.codes(ed_params, dev)
    if rule == "nearest":
      return jnp.argmin(((centres - code) ** 2).sum(-1)), code
    norms = jax.vmap(lambda gp: edit_norm(clip_layers(self.editor.apply(
        {"params": gp}, _elements(self.ctx.task, dev)), self.cfg.sample_epsilon)))(group_params)
    return jnp.argmin(norms), code

  # -- meta-training pieces
  def meta_loss(self, params, query):
    return self.ctx.task.meta_loss(self.ctx.model, params, query)

  def validator(self, params_of):
    """params_of(net_params, dev) -> device params; mean selection metric on validation."""
    return meta_train.validator(self.ctx.task, self.ctx.model, self.ctx.val, params_of)


def _pool(ctx):
  pc = ctx.config.persona
  t = time.time()
  pool = meta_train.encode_devices(ctx.task, ctx.model, ctx.params, range(pc.meta_devices),
                                   pc.meta_query_size, what="persona meta windows",
                                   workdir=ctx.workdir)
  logging.info("persona: encoded %d meta windows in %.1fs", pc.meta_devices, time.time() - t)
  return pool


def _train(fam, stage, params0, episode_loss, params_of, pool_fn):
  """One meta-training stage over the meta windows (meta_train.train_selected)."""
  ctx, pc = fam.ctx, fam.cfg

  def loss_fn(net, batch):
    loss, metric = jax.vmap(lambda d: episode_loss(net, d))(batch)
    return loss.mean(), {f"query_{ctx.task.selection_metric.name}": metric.mean()}

  def make_batches():
    pool = pool_fn()
    return lambda step: meta_train.pool_batch(pool, pc.devices_per_step, ctx.config.seed, step,
                                              _salt(stage))

  return meta_train.train_selected(
      stage, params0, pc, loss_fn=loss_fn, validate=fam.validator(params_of),
      make_batches=make_batches, cfg=ctx.config, workdir=ctx.workdir, metrics=ctx.metrics,
      key="net_params", metric=ctx.task.selection_metric.name, config_key="persona",
      hint="Lower persona.learning_rate.")


def _salt(stage: str) -> int:
  """A stage's own stream of batch permutations (a stable hash of its name)."""
  import zlib
  return {"duet": 21, "persona_editor": 22}.get(stage, zlib.crc32(stage.encode()) % 2 ** 31)


def train_duet(fam, pool_fn, freeze: bool, stage: str):
  """DUET's generator; the heads' offsets start at the global layers (module docstring).
  `freeze`: the heads stay as initialised (the official code's untrained heads)."""
  ctx = fam.ctx
  task, cfg = ctx.task, ctx.config
  gen0 = fam.generator.init(jax.random.key(cfg.seed + 11), fam.example_elements())["params"]
  gen0 = jax.tree.map(lambda x: x, gen0)
  for n, (k, b) in enumerate(fam.base_layers):
    gen0["heads"][f"a_{n}"], gen0["heads"][f"b_{n}"] = k.reshape(-1), b
  frozen = gen0.pop("heads") if freeze else None
  with_heads = lambda net: {**net, "heads": frozen} if freeze else net
  duet_of = lambda net, dev: fam.duet_params(with_heads(net), dev)
  duet_loss = lambda net, dev: fam.meta_loss(duet_of(net, dev), dev[task.query_role])
  net, summary = _train(fam, stage, gen0, duet_loss, duet_of, pool_fn)
  return with_heads(net), summary


def train_editor(fam, pool_fn, eps: float, stage: str):
  """Persona Stage A: the single-prototype editor with clip bound eps."""
  ctx = fam.ctx
  task, cfg, pc = ctx.task, ctx.config, fam.cfg
  ed0 = fam.editor.init(jax.random.key(cfg.seed + 12), fam.example_elements())["params"]

  def single_loss(net, dev):
    ed = fam.editor.apply({"params": net}, _elements(task, dev))
    p = P.apply_edit(ctx.params, fam.layers.as_edit(clip_layers(ed, eps)))
    loss, metric = fam.meta_loss(p, dev[task.query_role])
    return loss + pc.edit_penalty * edit_norm(ed) ** 2 / fam.layers.floats(), metric

  return _train(fam, stage, ed0, single_loss,
                lambda net, dev: fam.single_params(net, dev, eps), pool_fn)


def train_prototypes(fam, ed_params, pool_fn, k: int, stage: str) -> dict:
  """Stage B (k-means over the meta windows' Stage-A layer codes; recomputed identically from
  the same editor on a resumed run) and Stage C (k prototype editors). Returns {'groups',
  'centres', 'sizes', 'summary'}."""
  ctx, pc = fam.ctx, fam.cfg
  k_codes, centres, labels, sizes = _cluster(fam, ed_params, pool_fn, k, stage)

  # Stage C: k prototype editors, copy g on cluster g's windows. Each copy keeps Stage A's
  # window encoder and layer GRU but starts its heads afresh (zero offsets, small random
  # maps): at step 0 a window gets its prototype's edit and almost no sample edit, instead of
  # the prototype's edit plus a second full Stage-A edit. A step trains one copy on a batch
  # of its own cluster's windows (copies in turn: g = step mod k), so a step gathers and
  # updates one copy, not one per window.
  group0 = _fresh_groups(fam, ed_params, k)
  loss_fn = _group_loss_fn(fam, ed_params)
  served = _served_centres(fam, k_codes, labels, centres)
  make_batches = _group_batches(fam, pool_fn, labels, served, k)

  def group_of(net, dev):
    g, _ = fam.assign(ed_params, net, centres, dev, "nearest")
    return fam.group_params(ed_params, net, centres, g, dev)

  groups, summary = meta_train.train_selected(
      stage, group0, pc, loss_fn=loss_fn, validate=fam.validator(group_of),
      make_batches=make_batches, cfg=ctx.config, workdir=ctx.workdir, metrics=ctx.metrics,
      key="net_params", metric=ctx.task.selection_metric.name, config_key="persona",
      hint="Lower persona.learning_rate.")
  return {"groups": groups, "centres": jnp.asarray(centres), "sizes": sizes,
          "summary": {**summary, "cluster_sizes": sizes.tolist()}}


def _cluster(fam, ed_params, pool_fn, k: int, stage: str) -> tuple:
  """Stage B: k-means over the meta windows' Stage-A layer codes. Returns (codes, centres,
  labels, sizes); refuses a k that leaves a prototype without a training window."""
  codes_fn = jax.jit(jax.vmap(lambda d: fam.codes(ed_params, d)))
  k_codes = _codes_of_pool(fam.ctx, codes_fn, pool_fn)
  centres, labels = jax.jit(kmeans, static_argnums=(1, 2))(
      k_codes, k, fam.cfg.kmeans_iterations, jax.random.key(fam.ctx.config.seed + 13))
  labels = np.asarray(labels, np.int32)
  sizes = np.bincount(labels, minlength=k)
  logging.info("%s: %d prototypes, cluster sizes %s", stage, k, sizes.tolist())
  if (sizes == 0).any():
    raise ConfigError(
        f"k-means left prototype(s) {np.flatnonzero(sizes == 0).tolist()} of {k} without a "
        f"training window ({len(labels)} windows; sizes {sizes.tolist()}): their editors "
        f"could not train. Lower the number of prototypes (persona.prototypes or "
        f"persona.ablations.prototypes) or raise persona.meta_devices")
  return k_codes, centres, labels, sizes


def _fresh_groups(fam, ed_params, k: int):
  """Stage C's k editors stacked on a leading axis: Stage A's editor with fresh heads each."""
  seed = fam.ctx.config.seed

  def fresh_heads(g):
    h = fam.editor.init(jax.random.key(seed + 100 + g), fam.example_elements())["params"]
    return dict(ed_params, heads=h["heads"])

  return jax.tree.map(lambda *xs: jnp.stack(xs), *[fresh_heads(g) for g in range(k)])


def _group_loss_fn(fam, ed_params):
  """Stage C's loss on a batch of one cluster's windows, each decoded from its served centre;
  the sample edit's norm is penalised as Stage A's edit is."""
  task, pc = fam.ctx.task, fam.cfg

  def group_loss(net, dev, g, centre):
    p = fam.params_at(ed_params, net, centre, g, dev)
    sample = fam.editor.apply({"params": jax.tree.map(lambda x: x[g], net)},
                              _elements(task, dev))
    loss, metric = fam.meta_loss(p, dev[task.query_role])
    return loss + pc.edit_penalty * edit_norm(sample) ** 2 / fam.layers.floats(), metric

  def loss_fn(net, batch):
    loss, metric = jax.vmap(lambda d, c: group_loss(net, d, batch["cluster"], c))(
        batch["dev"], batch["centre"])
    return loss.mean(), {f"query_{task.selection_metric.name}": metric.mean()}

  return loss_fn


def _served_centres(fam, k_codes, labels, centres) -> np.ndarray:
  """The centres a window's prototype edit is decoded from in training, [R + 1, N, C]: index
  0 the fixed centre, index r + 1 the device-scope refined centre at refine_rates[r]."""
  pc = fam.cfg
  served = [np.asarray(centres)[labels]]
  if pc.refine_training:
    w = fam.ctx.task.meta_windows_per_stream()
    served += [np.asarray(history_centres(k_codes, jnp.asarray(labels), centres, w, r))
               for r in pc.refine_rates]
  return np.stack(served)


def _group_batches(fam, pool_fn, labels, served, k: int):
  """Stage C's make_batches: step s trains copy g = s mod k on cluster g's windows (a seeded
  permutation per round), each with the fixed or a refined centre."""
  pc, seed = fam.cfg, fam.ctx.config.seed
  members = [np.flatnonzero(labels == g) for g in range(k)]

  def make_batches():
    pool = pool_fn()

    def batch(step):
      g = step % k
      ids = members[g]
      rnd, pos = divmod(step // k, max(len(ids) // pc.devices_per_step, 1))
      perm = np.random.default_rng([seed, 23, g, rnd]).permutation(ids)
      take = perm[np.arange(pos * pc.devices_per_step, (pos + 1) * pc.devices_per_step)
                  % len(perm)]
      # half the windows keep the fixed centre, the rest one of the refined ones
      rng, r = np.random.default_rng([seed, 24, step]), len(served) - 1
      which = (np.where(rng.random(len(take)) < 0.5, 0, rng.integers(1, r + 1, len(take)))
               if r else np.zeros(len(take), np.int64))
      return {"dev": jax.tree.map(lambda v: v[take], pool), "cluster": np.int32(g),
              "centre": served[which, take]}
    return batch

  return make_batches


def _codes_of_pool(ctx, codes_fn, pool_fn, chunk: int = 512):
  pool = pool_fn()
  n = len(jax.tree.leaves(pool)[0])
  out = [np.asarray(codes_fn(jax.tree.map(lambda v: v[s:s + chunk], pool)))
         for s in range(0, n, chunk)]
  return jnp.asarray(np.concatenate(out))
