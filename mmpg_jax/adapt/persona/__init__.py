r"""Persona and DUET: cloud networks that turn a device's real-time data into its adaptive layers
(docs/methods.md). Written once for any task: the real-time data is
the window's unlabelled context as the task's primary anchor elements (image embeddings for
drifting digits, frame elements for video), read in arrival order; the adaptive layers are the
Dense layers `persona.layers` names (kernel [in, out] + bias [out]).

DUET (`duet`): window -> GRU -> MLP -> code c; per adaptive layer the heads W = c A + a,
  b = c B + β *replace* the layer (apply_edit mode "replace"). The heads are learnable (the
  official code's never train: `persona.freeze_heads=True` reproduces that, docs/methods.md).
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
  training distribution (refinement then never helped).
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
from mmpg_jax.adapt.persona.networks import Editor, Generator, adaptive_layers
from mmpg_jax.adapt.persona.rows import (ablation, duet_method, make_methods, persona_method,
                                         single_method)
from mmpg_jax.adapt.persona.stages import Family, _pool, train_duet, train_editor, train_prototypes
from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import need, positive


def validate_config(cfg, task, model, abstract_params) -> None:
  pc = cfg.persona
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
    positive(cfg, key)
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


def build(ctx):
  """Meta-trains (or reloads) DUET's generator and Persona's editor, prototypes and prototype
  editors, and the ablations `persona.ablations` asks for; returns duet, persona_single,
  persona, persona_dynamic and the ablation rows."""
  params, cfg = ctx.params, ctx.config
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
  # DUET's validation curve beside the global model's in the report
  ctx.extra.setdefault("training_curves", {})["duet"] = duet_summary
  methods = make_methods(fam, gen_params, ed_params, {k: protos[k] for k in pc.prototypes})
  # Ablations: learnable vs frozen heads, the clip bound, the number of prototypes.
  if ab.frozen_heads and not pc.freeze_heads:
    g, summ = train_duet(fam, pool_fn, True, "duet_frozen_heads")
    ctx.extra["persona"]["duet_frozen_heads"] = summ
    methods.append(ablation(duet_method(fam, g, "duet_frozen_heads"), "duet", "heads frozen"))
  for eps in ab.epsilons:
    e, summ = train_editor(fam, pool_fn, eps, f"persona_editor_eps{eps:g}")
    ctx.extra["persona"][f"editor_eps{eps:g}"] = summ
    methods.append(ablation(single_method(fam, e, eps, f"persona_single_eps{eps:g}"),
                            "persona_single", f"epsilon {eps:g}"))
  for k in ab.prototypes:
    methods.append(ablation(persona_method(fam, ed_params, {k: protos[k]}, f"persona_k{k}"),
                            "persona", f"{k} prototypes"))
  return methods
