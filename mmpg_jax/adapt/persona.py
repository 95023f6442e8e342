r"""Persona and DUET: cloud networks that turn a device's real-time data into its adaptive layers
(DESIGN §3.2–3.3, reference/papers.md §2–3). Written once for any task: the real-time data is
the window's unlabelled context as the task's primary anchor elements (image embeddings for
drifting digits, frame elements for video), read in arrival order; the adaptive layers are the
Dense layers `persona.layers` names (kernel [in, out] + bias [out]).

DUET (`duet`): window -> GRU -> MLP -> code c; per adaptive layer the heads W = c A + a,
  b = c B + β *replace* the layer (apply_edit mode "replace"). The heads are learnable (the
  official code's never train: `persona.freeze_heads=True` reproduces that, papers.md §2.5).
  The official code trains the whole model from scratch; here the backbone is the cloud's
  frozen global model, so each head's offset `a` starts at the global layer's weights.
Persona, the editor (Stage A; alone it is `persona_single`): window -> code c0 -> a GRU across
  the adaptive layers (cross-layer knowledge transfer: layer n's code depends on the layers
  before it) -> layer codes e_n = tanh(Dense_n(h_n)) -> heads -> ΔW_n; the device uses
  W_n = W_base_n + clip(ΔW_n, ±ε). (Official: a stacked GRU over [c0]*N and one MLP shared by
  every layer; ours has one Dense per layer.)
Prototypes (Stage B): k-means in JAX (k-means++ seeding, Lloyd steps) over the meta windows'
  concatenated layer codes; prototype g decodes its centre with the Stage-A heads.
Prototype editors (Stage C): K copies of the Stage-A editor (fresh heads), copy g
  meta-trained on the windows of cluster g for a sample edit on top of prototype g:
  W = W_base + clip(proto_g + clip(sample_g(x), ±ε_s), ±ε), with a penalty on the sample edit.
  With `persona.refine_training` (default on) a training window's prototype edit is decoded,
  as often as not, from the centre the device-scope refinement would hold for it (its meta
  stream's earlier windows, `history_centres`, at a rate drawn from `refine_rates`): without
  it the decoder only ever meets the K fixed centres, and a refined centre is off its
  training distribution (issue 10, step 1: refinement then never helped).
The number of prototypes K is chosen on validation devices among `persona.prototypes`.
Assignment, chosen on validation devices: `nearest` (the k-means assignment of the window's
  Stage-A code) or `min_edit` (the prototype whose editor needs the smallest sample edit: the
  official dynamic inference).
`persona` keeps the centres fixed. `persona_dynamic` refines them as windows arrive (our rule;
  the sources do not give one), the cloud serving every device's window t with the current
  state and refining it before t+1; scope and EMA rate are chosen on validation devices:
  scope "population" (`refine`): each centre moves towards the mean Stage-A code of the windows
  assigned to it, and each prototype's population is tracked; when two centres drift closer
  than `merge_ratio` x the initial median centre spacing they merge (population-weighted) and
  the freed prototype splits the most spread-out one (half-way towards its farthest window),
  so K stays fixed. Scope "device" (`refine_personal`): each device's own copy of its
  assigned centre moves towards its codes as its stream goes on (a new copy when it is
  assigned elsewhere), so its prototype edit follows its drift.
Every method here: no device backward pass, no label; the device encodes its window and
uploads its elements, and receives its adaptive layers.
"""
import dataclasses
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmpg_jax import config_checks, costs, meta_train
from mmpg_jax.kmeans import kmeans, kmeanspp, lloyd  # noqa: F401  (persona.kmeans in tests)
from mmpg_jax.kmeans import sqdist as _sqdist
from mmpg_jax import params as P
from mmpg_jax.adapt.baselines import Method, grid


# ---- networks ----------------------------------------------------------------------------------

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
      raise config_checks.ConfigError(
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



def median_spacing(centres) -> float:
  d = np.sqrt(np.asarray(_sqdist(centres, centres)))
  return float(np.median(d[~np.eye(len(d), dtype=bool)])) if len(d) > 1 else 1.0


def refine(state, codes, assign, rate, merge_distance):
  """One time step of the dynamic prototypes (module docstring): state {'centres' [K, C],
  'population' [K]}, the step's windows' Stage-A codes [M, C] and prototypes [M]."""
  c, pop = state["centres"], state["population"]
  k = c.shape[0]
  onehot = jax.nn.one_hot(assign, k)
  count = onehot.sum(0)
  mean = onehot.T @ codes / jnp.maximum(count, 1.0)[:, None]
  c = jnp.where(count[:, None] > 0, c + rate * (mean - c), c)
  pop = (1 - rate) * pop + rate * count / jnp.maximum(count.sum(), 1.0)
  # Merge the closest pair if too close; the freed slot splits the most spread-out other
  # prototype half-way towards its farthest window. Merge and split go together (K stays
  # fixed), so a merge waits until a split is possible: another prototype (K >= 3) with two
  # or more windows this step whose new centre lies farther than the merge distance from its
  # source (no merge-split cycling).
  d = jnp.sqrt(_sqdist(c, c)) + jnp.where(jnp.eye(k, dtype=bool), jnp.inf, 0.0)
  flat = jnp.argmin(d)
  i, j = flat // k, flat % k
  dist_to = jnp.sqrt(((codes - c[assign]) ** 2).sum(-1))                 # [M]
  spread = onehot.T @ dist_to / jnp.maximum(count, 1.0)
  others = (jnp.arange(k) != i) & (jnp.arange(k) != j)
  s = jnp.argmax(jnp.where(others, spread, -jnp.inf))
  far = codes[jnp.argmax(jnp.where(assign == s, dist_to, -jnp.inf))]
  half = 0.5 * (c[s] + far)
  wi, wj = pop[i], pop[j]
  merged = jnp.where(wi + wj > 0, (wi * c[i] + wj * c[j]) / jnp.maximum(wi + wj, 1e-12),
                     0.5 * (c[i] + c[j]))
  c_m = c.at[i].set(merged).at[j].set(half)
  pop_m = pop.at[i].set(wi + wj).at[j].set(0.5 * pop[s]).at[s].set(0.5 * pop[s])
  do = ((d[i, j] < merge_distance) & others[s] & (count[s] > 1)
        & (jnp.sqrt(((half - c[s]) ** 2).sum()) > merge_distance))
  return {"centres": jnp.where(do, c_m, c), "population": jnp.where(do, pop_m, pop),
          "merges": state["merges"] + do.astype(jnp.int32)}


def history_centres(codes, labels, centres, windows: int, rate: float):
  """The centre device-scope refinement serves each meta window with: meta ids come in streams
  of `windows` consecutive windows (`task.meta_windows_per_stream`); each stream is replayed
  through `refine_personal` in time order with assignments `labels`. Returns [N, C]: window i's
  centre before its own code is seen (a stream's first window: its prototype's centre)."""
  n, c = codes.shape
  streams = -(-n // windows)
  pad = streams * windows - n                    # a partial last stream: padded, then dropped
  codes_s = jnp.pad(codes, ((0, pad), (0, 0))).reshape(streams, windows, c)
  labels_s = jnp.pad(labels, (0, pad)).reshape(streams, windows)
  ids = jnp.arange(streams)

  def step(state, t):
    g, code = labels_s[:, t], codes_s[:, t]
    centre = jnp.where((state["owner"] == g)[:, None], state["personal"], centres[g])
    return refine_personal(state, centre, code, ids, g, rate), centre

  state = {"personal": jnp.zeros((streams, c), codes.dtype),
           "owner": jnp.full((streams,), -1, jnp.int32)}
  _, served = jax.lax.scan(step, state, jnp.arange(windows))      # [W, streams, C]
  return jnp.swapaxes(served, 0, 1).reshape(-1, c)[:n]


def refine_personal(state, centre, code, device, assign, rate):
  """Scope "device": each served device's own copy of its prototype's centre moves towards
  its window's code, c_d <- c_d + rate (code - c_d); a device assigned to another prototype
  starts a new copy from that prototype's centre (adapt reads `owner`)."""
  moved = centre + rate * (code - centre)
  return dict(state, personal=state["personal"].at[device].set(moved),
              owner=state["owner"].at[device].set(assign))


# ---- stateful methods: what the evaluator runs in time order -----------------------------------

@dataclasses.dataclass(frozen=True)
class Stream:
  """A method whose cloud keeps state across time (`evaluate.Evaluator` serves every entry of
  window position t with the state, then `refine`s it with what those entries reported)."""
  init: Callable                     # (hp, the split's device ids) -> state
  adapt: Callable                    # (params, dev, hp, state) -> (params, report)
  refine: Callable                   # (state, reports stacked over the step's entries, hp)


# ---- the family ----------------------------------------------------------------------------------

def validate_config(cfg, task, model, abstract_params) -> None:
  pc = cfg.persona
  need = config_checks.need
  for key in ("assignment", "refine_rates", "refine_scopes"):
    need(len(pc[key]) > 0, f"persona.{key}", pc[key], "a grid needs at least one value")
  for key in ("merge_ratio", "edit_penalty"):
    need(pc[key] >= 0, f"persona.{key}", pc[key], "must be >= 0")
  ab = pc.ablations
  need(all(e > 0 for e in ab.epsilons), "persona.ablations.epsilons", ab.epsilons,
       "every clip bound must be > 0")
  need(all(isinstance(k, int) and 1 <= k <= pc.meta_devices for k in ab.prototypes),
       "persona.ablations.prototypes", ab.prototypes,
       f"each K between 1 and the {pc.meta_devices} training windows (persona.meta_devices)")
  for key in ("persona.code_dim", "persona.hidden", "persona.meta_devices",
              "persona.devices_per_step", "persona.num_steps", "persona.learning_rate",
              "persona.kmeans_iterations", "persona.eval_every", "persona.log_every",
              "persona.checkpoint_every"):
    config_checks.positive(cfg, key)
  need(pc.epsilon > 0, "persona.epsilon", pc.epsilon, "the edit clip ε must be > 0")
  need(pc.sample_epsilon > 0, "persona.sample_epsilon", pc.sample_epsilon,
       "the sample-edit clip ε_s must be > 0")
  need(isinstance(pc.prototypes, (tuple, list)) and len(pc.prototypes) > 0
       and all(isinstance(k, int) and 1 <= k <= pc.meta_devices for k in pc.prototypes),
       "persona.prototypes", pc.prototypes,
       f"the K values chosen among on validation, each 1 <= K <= the {pc.meta_devices} "
       f"training windows (persona.meta_devices) k-means clusters")
  need(all(0 < r <= 1 for r in pc.refine_rates), "persona.refine_rates", pc.refine_rates,
       "EMA rates in (0, 1]")
  need(pc.assignment and set(pc.assignment) <= {"nearest", "min_edit"}, "persona.assignment",
       pc.assignment, "a non-empty subset of ('nearest', 'min_edit')")
  need(pc.refine_scopes and set(pc.refine_scopes) <= {"population", "device"},
       "persona.refine_scopes", pc.refine_scopes,
       "a non-empty subset of ('population', 'device')")
  adaptive_layers(abstract_params, pc.layers)


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
                                   pc.meta_query_size, what="persona meta windows")
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


def build(ctx):
  """Meta-trains (or reloads) DUET's generator and Persona's editor, prototypes and prototype
  editors, and the ablations `persona.ablations` asks for; returns duet, persona_single,
  persona, persona_dynamic and the ablation rows."""
  task, model, params, cfg = ctx.task, ctx.model, ctx.params, ctx.config
  pc = cfg.persona
  layers = adaptive_layers(params, pc.layers)
  flat = P.flatten(params)
  base = tuple((flat[f"{p}/kernel"], flat[f"{p}/bias"]) for p in layers.paths)
  fam = Family(ctx, layers, Generator(layers.shapes, pc.hidden, pc.code_dim, pc.head_scale),
               Editor(layers.shapes, pc.hidden, pc.code_dim, pc.head_scale), base)
  cache = {}

  def pool_fn():                      # encoded once, only if some stage needs it
    if "pool" not in cache:
      cache["pool"] = _pool(ctx)
    return cache["pool"]

  ab = pc.ablations
  gen_params, duet_summary = train_duet(fam, pool_fn, pc.freeze_heads, "duet")
  ed_params, single_summary = train_editor(fam, pool_fn, pc.epsilon, "persona_editor")
  # One prototype set per K, shared by persona / persona_dynamic (K chosen on validation
  # among persona.prototypes) and the ablation rows persona_k{K}.
  protos = {k: train_prototypes(fam, ed_params, pool_fn, k, f"persona_prototypes_k{k}")
            for k in sorted(set(pc.prototypes) | set(ab.prototypes))}
  ctx.extra["persona"] = {"duet": duet_summary, "editor": single_summary,
                          "prototypes": {f"k{k}": p["summary"] for k, p in protos.items()},
                          "generator_params": P.tree_size(gen_params),
                          "editor_params": P.tree_size(ed_params)}
  methods = make_methods(fam, gen_params, ed_params, {k: protos[k] for k in pc.prototypes})
  # Ablations (issue 10): learnable vs frozen heads, the clip bound, the number of prototypes.
  if ab.frozen_heads and not pc.freeze_heads:
    g, summ = train_duet(fam, pool_fn, True, "duet_frozen_heads")
    ctx.extra["persona"]["duet_frozen_heads"] = summ
    methods.append(ablation(duet_method(fam, g, "duet_frozen_heads"), "heads frozen"))
  for eps in ab.epsilons:
    e, summ = train_editor(fam, pool_fn, eps, f"persona_editor_eps{eps:g}")
    ctx.extra["persona"][f"editor_eps{eps:g}"] = summ
    methods.append(ablation(single_method(fam, e, eps, f"persona_single_eps{eps:g}"),
                            f"epsilon {eps:g}"))
  for k in ab.prototypes:
    methods.append(ablation(persona_method(fam, ed_params, {k: protos[k]}, f"persona_k{k}"),
                            f"{k} prototypes"))
  return methods


def ablation(method, what):
  return dataclasses.replace(method, info=dict(method.info, ablation=what))


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
  ctx = fam.ctx
  task, cfg, pc = ctx.task, ctx.config, fam.cfg
  codes_fn = jax.jit(jax.vmap(lambda d: fam.codes(ed_params, d)))
  k_codes = _codes_of_pool(ctx, codes_fn, pool_fn)
  centres, labels = jax.jit(kmeans, static_argnums=(1, 2))(
      k_codes, k, pc.kmeans_iterations, jax.random.key(cfg.seed + 13))
  labels = np.asarray(labels, np.int32)
  sizes = np.bincount(labels, minlength=k)
  logging.info("%s: %d prototypes, cluster sizes %s", stage, k, sizes.tolist())
  if (sizes == 0).any():
    raise config_checks.ConfigError(
        f"k-means left prototype(s) {np.flatnonzero(sizes == 0).tolist()} of {k} without a "
        f"training window ({len(labels)} windows; sizes {sizes.tolist()}): their editors "
        f"could not train. Lower the number of prototypes (persona.prototypes or "
        f"persona.ablations.prototypes) or raise persona.meta_devices")

  # Stage C: k prototype editors, copy g on cluster g's windows. Each copy keeps Stage A's
  # window encoder and layer GRU but starts its heads afresh (zero offsets, small random
  # maps): at step 0 a window gets its prototype's edit and almost no sample edit, instead of
  # the prototype's edit plus a second full Stage-A edit. A step trains one copy on a batch
  # of its own cluster's windows (copies in turn: g = step mod k), so a step gathers and
  # updates one copy, not one per window.
  def fresh_heads(g):
    h = fam.editor.init(jax.random.key(cfg.seed + 100 + g), fam.example_elements())["params"]
    return dict(ed_params, heads=h["heads"])

  group0 = jax.tree.map(lambda *xs: jnp.stack(xs), *[fresh_heads(g) for g in range(k)])

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

  members = [np.flatnonzero(labels == g) for g in range(k)]
  # The centres a window's prototype edit is decoded from in training: index 0 the fixed
  # centre, index r + 1 the device-scope refined centre at refine_rates[r].
  served = [np.asarray(centres)[labels]]
  if pc.refine_training:
    w = task.meta_windows_per_stream()
    served += [np.asarray(history_centres(k_codes, jnp.asarray(labels), centres, w, r))
               for r in pc.refine_rates]
  served = np.stack(served)                                            # [R + 1, N, C]

  def make_batches():
    pool = pool_fn()

    def batch(step):
      g = step % k
      ids = members[g]
      rnd, pos = divmod(step // k, max(len(ids) // pc.devices_per_step, 1))
      perm = np.random.default_rng([cfg.seed, 23, g, rnd]).permutation(ids)
      take = perm[np.arange(pos * pc.devices_per_step, (pos + 1) * pc.devices_per_step)
                  % len(perm)]
      # half the windows keep the fixed centre, the rest one of the refined ones
      rng, r = np.random.default_rng([cfg.seed, 24, step]), len(served) - 1
      which = (np.where(rng.random(len(take)) < 0.5, 0, rng.integers(1, r + 1, len(take)))
               if r else np.zeros(len(take), np.int64))
      return {"dev": jax.tree.map(lambda v: v[take], pool), "cluster": np.int32(g),
              "centre": served[which, take]}
    return batch

  def group_of(net, dev):
    g, _ = fam.assign(ed_params, net, centres, dev, "nearest")
    return fam.group_params(ed_params, net, centres, g, dev)

  groups, summary = meta_train.train_selected(
      stage, group0, pc, loss_fn=loss_fn, validate=fam.validator(group_of),
      make_batches=make_batches, cfg=cfg, workdir=ctx.workdir, metrics=ctx.metrics,
      key="net_params", metric=task.selection_metric.name, config_key="persona",
      hint="Lower persona.learning_rate.")
  return {"groups": groups, "centres": jnp.asarray(centres), "sizes": sizes,
          "summary": {**summary, "cluster_sizes": sizes.tolist()}}


def _codes_of_pool(ctx, codes_fn, pool_fn, chunk: int = 512):
  pool = pool_fn()
  n = len(jax.tree.leaves(pool)[0])
  out = [np.asarray(codes_fn(jax.tree.map(lambda v: v[s:s + chunk], pool)))
         for s in range(0, n, chunk)]
  return jnp.asarray(np.concatenate(out))


def _cost(fam, downlink_floats: float, extra_bytes: int = 0):
  ctx = fam.ctx
  task, cfg = ctx.task, ctx.config
  n_ctx = cfg.data.context_size
  dbytes = costs.dtype_bytes(cfg.comm_dtype)
  mod = task.anchor_modalities[0]
  el_dim = task.anchor_dims(ctx.model, ctx.params)[mod]
  n_el = task.num_elements(ctx.model, ctx.params, n_ctx)[mod]
  return costs.DeviceCost(uplink_bytes=n_el * el_dim * dbytes,
                          downlink_bytes=downlink_floats * dbytes + extra_bytes,
                          device_flops=ctx.cost_model.encode(n_ctx))


def _info(fam):
  task, cfg = fam.ctx.task, fam.ctx.config
  mod = task.anchor_modalities[0]
  return {"real_time_elements": task.num_elements(fam.ctx.model, fam.ctx.params,
                                                  cfg.data.context_size)[mod],
          "adaptive_layers": list(fam.layers.paths)}


def duet_method(fam, gen_params, name="duet"):
  """Downlink per window: the generated layers, whole."""
  cost = _cost(fam, fam.layers.floats())
  return Method(name, ({},), lambda params, dev, hp: fam.duet_params(gen_params, dev),
                lambda hp: cost, uses=(fam.ctx.task.context_role,),
                info=dict(_info(fam), downlink="the adaptive layers, whole"))


def single_method(fam, ed_params, eps, name="persona_single"):
  cost = _cost(fam, fam.layers.floats())
  return Method(name, ({},), lambda params, dev, hp: fam.single_params(ed_params, dev, eps),
                lambda hp: cost, uses=(fam.ctx.task.context_role,),
                info=dict(_info(fam), epsilon=eps, downlink="the clipped edit"))


PROTOTYPE_ID_BYTES = 4


def persona_method(fam, ed_params, protos, name="persona"):
  """protos: {K: a trained prototype set}; K is a hyper-parameter chosen on validation.
  Downlink per window: the prototype's id and the clipped sample edit; the device holds the K
  prototype edits (downloaded once: `prototype_bank_bytes` in info, per K)."""
  pc = fam.cfg
  dbytes = costs.dtype_bytes(fam.ctx.config.comm_dtype)
  cost = _cost(fam, fam.layers.floats(), PROTOTYPE_ID_BYTES)

  def adapt(params, dev, hp):
    proto = protos[hp["prototypes"]]
    groups, centres = proto["groups"], proto["centres"]
    g, _ = fam.assign(ed_params, groups, centres, dev, hp["assignment"])
    return fam.group_params(ed_params, groups, centres, g, dev)

  return Method(name, grid(assignment=tuple(pc.assignment), prototypes=tuple(sorted(protos))),
                adapt, lambda hp: cost, uses=(fam.ctx.task.context_role,),
                info=dict(_info(fam), prototypes=sorted(protos),
                          cluster_sizes={f"k{k}": [int(s) for s in p["sizes"]]
                                         for k, p in protos.items()},
                          epsilon=pc.epsilon, sample_epsilon=pc.sample_epsilon,
                          prototype_bank_bytes={f"k{k}": k * fam.layers.floats() * dbytes
                                                for k in protos},
                          downlink="prototype id + the clipped sample edit"))


def make_methods(fam, gen_params, ed_params, protos):
  """duet, persona_single, persona and persona_dynamic from trained networks; protos: {K:
  prototype set} for the K values validation chooses among."""
  pc = fam.cfg
  methods = [duet_method(fam, gen_params), single_method(fam, ed_params, pc.epsilon),
             persona_method(fam, ed_params, protos)]
  static = methods[-1]
  spacing = {k: median_spacing(p["centres"]) for k, p in protos.items()}

  def init(hp, device_ids):
    n = int(np.max(device_ids)) + 1
    centres, sizes = protos[hp["prototypes"]]["centres"], protos[hp["prototypes"]]["sizes"]
    share = jnp.asarray(sizes / max(sizes.sum(), 1), jnp.float32)
    return {"centres": centres, "population": share, "merges": jnp.int32(0),
            "personal": jnp.zeros((n, centres.shape[1]), centres.dtype),
            "owner": jnp.full((n,), -1, jnp.int32)}

  def dyn_adapt(params, dev, hp, state):
    groups = protos[hp["prototypes"]]["groups"]
    g, code = fam.assign(ed_params, groups, state["centres"], dev, hp["assignment"])
    centre = state["centres"][g]
    if hp["scope"] == "device":      # the device's own copy of its prototype, while it stays
      i = dev["device_id"]
      centre = jnp.where(state["owner"][i] == g, state["personal"][i], centre)
    return (fam.params_at(ed_params, groups, centre, g, dev),
            {"code": code, "assign": g, "centre": centre, "device": dev["device_id"]})

  def dyn_refine(state, reports, hp):
    if hp["scope"] == "population":
      return dict(state, **refine(state, reports["code"], reports["assign"], hp["rate"],
                                  pc.merge_ratio * spacing[hp["prototypes"]]))
    return refine_personal(state, reports["centre"], reports["code"], reports["device"],
                           reports["assign"], hp["rate"])

  # A refined prototype no longer matches the device's copy of the bank: the downlink also
  # carries the refined prototype edit (an upper bound: sent every window).
  dyn_cost = _cost(fam, 2 * fam.layers.floats(), PROTOTYPE_ID_BYTES)
  methods.append(dataclasses.replace(
      static, name="persona_dynamic",
      grid=grid(assignment=tuple(pc.assignment), rate=tuple(pc.refine_rates),
                scope=tuple(pc.refine_scopes), prototypes=tuple(sorted(protos))),
      cost=lambda hp: dyn_cost,
      info=dict(static.info, merge_ratio=pc.merge_ratio,
                downlink="prototype id + the clipped sample edit + the refined prototype edit"),
      stream=Stream(init, dyn_adapt, dyn_refine)))
  return methods
