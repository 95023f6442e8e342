"""Blocks the experiment configs share: training, baselines, test-time rivals, CDC-MMPG (adr,
fda), its robustness variants (cdc_robust), the data-matched control (global_meta), Persona
and DUET, evaluation, the deployment studies and the report (configs/common_data.py has the
data and model blocks).

Every experiment config composes these blocks and sets its own values on top; none loads
another experiment config. Loaded by path like every config (mmpg_jax/config_loader.module),
never imported as a package. Each function returns a fresh ml_collections.ConfigDict;
`smoke=True` gives the tiny settings of the `smoke` variants (every stage end to end, in
minutes, numbers meaningless).
"""
import ml_collections as mlc


def check_variant(arg: str, variants: tuple):
  """Refuses a variant the config does not know (e.g. a typo after --config=FILE:)."""
  if arg not in variants:
    raise ValueError(f"unknown config variant {arg!r}; use one of {variants}")


# ---------- the global model and the baselines ------------------------------------------------

def train(smoke=False):
  """The global model's training. schedule: "cosine" (warmup, then decay to 0) or "constant"
  (warmup, then held); eval_every > 0 scores the global model on the validation devices every
  that many steps and keeps the best (0: the last step's model)."""
  t = mlc.ConfigDict(dict(
      num_steps=1500, batch_size=64, learning_rate=2e-3, warmup_steps=50, weight_decay=1e-4,
      schedule="cosine", eval_every=0,
      log_every=100, checkpoint_every=250, keep_checkpoints=2))
  if smoke:
    t.update(dict(num_steps=6, batch_size=16, log_every=2, checkpoint_every=3, warmup_steps=1))
  return t


def baselines(leaves, tent_leaves, smoke=False, retrieval=False):
  """The baselines family (adapt/baselines.py). `leaves`: what on-device fine-tuning (FTA)
  and the oracle change (the model's dynamic leaves); `tent_leaves`: the norms TENT adapts;
  `retrieval`: a retrieval task's oracle grid and rivals (QB-Norm, dual softmax)."""
  # Which baselines the family builds (a task may lack what one needs: seqrec has no
  # unlabelled-row objective for TENT and no oracle data).
  b = mlc.ConfigDict(dict(include=("global", "fta", "tent", "prior_em", "qb_norm", "dsl",
                                   "oracle")))
  # On-device fine-tuning: learning rate and steps chosen on validation devices, per k.
  b.fta = mlc.ConfigDict(dict(ks=(1, 5, 10), learning_rates=(1e-3, 3e-3, 1e-2, 3e-2),
                              steps=(5, 20), leaves=leaves))
  b.tent = mlc.ConfigDict(dict(learning_rates=(1e-4, 1e-3, 1e-2), steps=(1, 5, 20),
                               leaves=tent_leaves))
  b.prior_em = mlc.ConfigDict(dict(
      iterations=20, smoothing=(0.0, 2.0, 8.0), scales=(0.5, 1.0),
      variants=("all", "asked")))       # prior_em (every question type), prior_em_asked
  # The oracle's grid brackets its choice (seed 0: 1e-3 and 100 steps chose among 1e-3..1e-2
  # x 50..200, the rate at the grid's edge; so the grid reaches below it).
  b.oracle = mlc.ConfigDict(dict(learning_rates=(3e-4, 1e-3, 3e-3), steps=(50, 100, 200),
                                 leaves=leaves))
  if retrieval and not smoke:
    # InfoNCE on 160 pairs wants more steps than cross-entropy does (chosen on validation).
    b.oracle.update(dict(learning_rates=(1e-3, 3e-3, 1e-2), steps=(100, 300)))
  if smoke:
    b.fta.update(dict(ks=(5,), learning_rates=(1e-2,), steps=(2,)))
    b.tent.update(dict(learning_rates=(1e-3,), steps=(2,)))
    b.prior_em.update(dict(iterations=3, smoothing=(2.0,), scales=(1.0,)))
    b.oracle.update(dict(learning_rates=(1e-2,), steps=(3,)))
  if retrieval:
    # The forward-only rivals of retrieval: querybank normalisation (dynamic inverted softmax
    # over 1,024 of the cloud's training queries; its inverse temperature) and dual softmax
    # (its temperature), chosen on validation devices.
    b.qb_norm = mlc.ConfigDict(dict(inverse_temperatures=(0.3, 1.0, 3.0, 10.0),
                                    bank_size=1024, dsl_temperatures=(0.3, 1.0, 3.0, 10.0)))
    if smoke:
      b.qb_norm.update(dict(inverse_temperatures=(0.3,), bank_size=32,
                            dsl_temperatures=(1.0,)))
  return b


def tta(smoke=False, foa_leaves=("answer_head/out/bias", "fusion/norm/bias")):
  """Forward-only test-time rivals (adapt/tta.py), chosen on validation devices; built for
  tasks with a linear classifier only (retrieval has no classes). `foa_leaves`: the offset
  FOA searches (by default the video QA model's 14 answer biases and 64 fusion-norm biases)."""
  t = mlc.ConfigDict(dict(
      include=("t3a", "lame", "foa"),
      t3a=dict(filter_k=(1, 5, 20, 0),              # supports kept per class; 0 = all
               bias=("zero", "keep")),             # T3A's zero bias, or the trained one
      lame=dict(knn=(3, 5, 10), bound_lambda=(0.5, 1.0), iterations=100),
      # FOA: CMA-ES over the offsets; the activation-discrepancy weight on a log grid (0 =
      # entropy alone), generations and the back-to-source shift chosen on validation
      foa=dict(leaves=foa_leaves,
               population=16, iterations=(10, 30), std_init=(0.1,),
               stat_weight=(0.0, 0.01, 0.1, 1.0), shift=(0.0, 0.5, 1.0))))
  if smoke:
    t.t3a.update(dict(filter_k=(5,), bias=("zero",)))
    t.lame.update(dict(knn=(3,), bound_lambda=(1.0,), iterations=5))
    t.foa.update(dict(population=4, iterations=(2,), std_init=(0.1,), stat_weight=(1.0,),
                      shift=(1.0,)))
  return t


def headline(c):
  """The default variant's share of the baselines: FTA at one budget (K = 5) and prior_em
  over every question type. The `study` variant keeps every row; each config's default also
  names its anchor selector and ablations (no K sweep) and one robustness variant beside the
  controls. Every forward-only rival stays: a reader judges the edit against all of them."""
  c.baselines.fta.ks = (5,)
  c.baselines.prior_em.variants = ("all",)
  return c


def real_video(c, smoke=False):
  """What every real video config (MSRVTT-QA, MSVD-QA, MSRVTT retrieval) changes in the
  shared blocks: a longer training on larger batches and fewer meta devices; at smoke size
  (the fixture files) one FTA budget, K = 2."""
  if smoke:
    c.baselines.fta.ks = (2,)
  else:
    c.train.update(dict(num_steps=6000, batch_size=256, learning_rate=1e-3, log_every=200,
                        checkpoint_every=500))
    # meta devices resample 4 categories: fewer than moving digits' fresh 6,144 (host memory
    # of the encoded pool: 48 samples x 12 frames x 256 floats each)
    c.fda.meta_devices = 2048
  return c


def run_blocks(c, smoke=False):
  """The blocks every experiment ends with: evaluation, what crosses the network, the
  deployment studies and the report (a config may change them after)."""
  c.eval = evaluation()
  c.comm_dtype = "float32"              # dtype of what crosses the network
  c.deploy = deploy(smoke)
  c.report = report()
  return c


def video_retrieval(c, data_blocks, smoke=False, frame_features=False):
  """The model and method blocks of a text-to-video retrieval config (moving digits, or a
  real dataset's frame features) on `c`; the caller sets its families and run blocks.
  `data_blocks`: the caller's configs/common_data.py module (the model blocks)."""
  c.model = data_blocks.video_retrieval_model(smoke, frame_features=frame_features)
  c.dynamic_leaves = data_blocks.VIDEO_RETRIEVAL_DYNAMIC
  c.train = train(smoke)
  c.baselines = baselines(c.dynamic_leaves, data_blocks.VIDEO_RETRIEVAL_NORMS, smoke,
                          retrieval=True)
  c.tta = tta(smoke)              # not built for retrieval (no classes)
  c.adr = adr(smoke)
  # InfoNCE over a meta device's 32 query pairs
  c.fda = fda(c.dynamic_leaves, smoke, meta_query_size=32)
  c.cdc_robust = cdc_robust(data_blocks.VIDEO_RETRIEVAL_NORMS, smoke)
  c.global_meta = global_meta(smoke)
  return c


def real_video_qa(c, data_blocks, smoke=False):
  """The whole of a real video QA config (MSRVTT-QA, MSVD-QA) on `c`, whose benchmark, task,
  seed and data the caller has set: every row of the embedded QA study on frame features.
  `data_blocks`: the caller's configs/common_data.py module (the model blocks)."""
  c.model = data_blocks.video_qa_model(smoke, frame_features=True)
  c.dynamic_leaves = data_blocks.VIDEO_QA_DYNAMIC
  c.train = train(smoke)
  c.baselines = baselines(c.dynamic_leaves, data_blocks.VIDEO_QA_NORMS, smoke)
  # One label group (the answer vocabulary) and no question types: asked questions only.
  c.baselines.prior_em.variants = ("asked",)
  # FOA's offsets: CMA-ES over the 1,000 answer biases would be too many
  c.tta = tta(smoke, foa_leaves=("fusion/norm/bias",))
  c.adr = adr(smoke)
  c.fda = fda(c.dynamic_leaves, smoke)
  c.cdc_robust = cdc_robust(data_blocks.VIDEO_QA_NORMS, smoke)
  # No shift parameters to widen on real data: no `wide` (nor what builds on it).
  c.cdc_robust.variants = ("em2", "gate", "cloud_tent", "mean_edit", "noisy_mean_edit",
                           "nearest_edit")
  c.global_meta = global_meta(smoke)
  # Modules under mmpg_jax/adapt/ whose build(ctx) give the methods, in the report's order.
  c.method_families = ("baselines", "global_meta", "tta", "cdc_mmpg", "cdc_robust")
  run_blocks(c, smoke)
  return real_video(c, smoke)


# ---------- CDC-MMPG and its controls ------------------------------------------------------------

def adr(smoke=False):
  """CDC-MMPG's ADR: which elements a device uploads as anchors (the selector, K and the
  ablation rows; k_sweep: the K of the rows cdc_mmpg_k{K})."""
  a = mlc.ConfigDict(dict(
      selector="herding", k=16,                       # default: 16 of 224 frame elements
      ablations=("uniform", "kcenter", "kmeanspp", "random", "all"),
      k_sweep=(1, 2, 4, 8, 16)))
  if smoke:
    a.update(dict(k=2, k_sweep=(2,), ablations=("random", "all")))
  return a


def fda(edit_leaves, smoke=False, meta_query_size=16):
  """CDC-MMPG's FDA: the cloud hypernetwork and its episodic meta-training over fresh meta
  devices. `edit_leaves`: what an edit changes; `meta_query_size`: a meta device's labelled
  queries (4 at smoke size)."""
  f = mlc.ConfigDict(dict(
      edit_leaves=edit_leaves,
      hidden=128, code_dim=128, num_queries=4, layer_dim=64, rank=2, full_delta_max=256,
      em_iterations=10, clip=3.0,
      use_device_prior=True, device_prior_smoothing=4.0,   # the device's EM summary (uplink)
      meta_devices=6144, meta_query_size=meta_query_size, devices_per_step=16,
      train_ks=(1, 2, 4, 8, 16, 0),                   # anchor budget per episode; 0 = all
      num_steps=3000, learning_rate=1e-3, warmup_steps=100, weight_decay=1e-4, grad_clip=1.0,
      aux_weight=1.0, edit_penalty=1e-3,
      eval_every=100, log_every=100, checkpoint_every=250,
      reference_devices=512,            # meta devices behind the diagnosis and the controls
      # the bases an FDA learns to edit: the global model, and the data-matched control
      # global_meta (row cdc_mmpg_on_global_meta: a second FDA, same recipe and meta devices)
      bases=("global", "global_meta")))
  if smoke:
    f.update(dict(hidden=16, code_dim=16, layer_dim=8, meta_devices=8, meta_query_size=4,
                  reference_devices=8, devices_per_step=4, train_ks=(1, 2, 0), num_steps=4,
                  warmup_steps=1, eval_every=2, log_every=2, checkpoint_every=2))
  return f


def cdc_robust(cloud_leaves, smoke=False):
  """CDC-MMPG beyond its training shifts (adapt/cdc_robust.py): variants and controls as rows
  cdc_mmpg_<name>; each grid holds the plain method (0 = off) and is chosen on validation.
  `cloud_leaves`: the norms cloud_tent adapts (the model's TENT leaves)."""
  r = mlc.ConfigDict(dict(
      variants=("em2", "gate", "cloud_tent", "wide", "routed", "ensemble", "mean_edit",
                "noisy_mean_edit", "nearest_edit"),
      em2_scales=(0.0, 0.25, 0.5, 1.0),  # second-round EM correction on the edited model
      noise_scales=(0.25, 0.5, 1.0),     # noisy_mean_edit: x the training edits' spread
      gate_temperatures=(0.0, 0.25, 0.5, 1.0, 2.0),   # 0 = no gate
      cloud_samples=8, cloud_learning_rates=(1e-3, 1e-2), cloud_steps=(0, 5, 20),
      cloud_leaves=cloud_leaves,
      # `wide`: meta-training over the training ranges of these families widened by this
      # factor (moving_digits.widen), a rule that reads the training ranges only. The held-out
      # groups' families (test OOD: rotation, blur, noise, clutter; validation OOD: stroke)
      # are named up front and the guard refuses any overlap with them, so the rule widens
      # the others: clutter strength 0-0.6 -> 0-0.9, contrast inversion 0.3 -> 0.45.
      wide_rule=dict(factor=1.5, families=("clutter_alpha", "invert_prob")),
      # `wide_text` (opt-in; retrieval): wide_data plus, per meta device, a share of phrasing
      # words (never the content) replaced by UNK and a share of captions in shuffled word
      # order, drawn from these ranges
      caption_noise=dict(unk=(0.25, 1.0), shuffle=(0.0, 1.0)),
      # `wide_mix` (opt-in) and the router's data: this share of meta devices from wide_data,
      # the rest as training's
      wide_mix_fraction=0.5,
      # `routed`: a router over the plain and wide FDAs (adapt/router.py), meta-trained on the
      # mixture; the rest of its stage's settings are config.fda's
      router=dict(hidden=64, meta_devices=2048, num_steps=1000, learning_rate=1e-3,
                  warmup_steps=50, eval_every=100, log_every=100, checkpoint_every=250),
      router_sharpness=(1.0, 2.0, 4.0)))   # x the router's logits at evaluation (1 = trained)
  if smoke:
    r.router.update(dict(hidden=8, meta_devices=8, num_steps=4, warmup_steps=1, eval_every=2,
                         log_every=2, checkpoint_every=2))
    r.update(dict(em2_scales=(0.0, 1.0), router_sharpness=(1.0, 4.0),
                  gate_temperatures=(0.0, 1.0), cloud_samples=4, cloud_learning_rates=(1e-2,),
                  cloud_steps=(0, 2)))
  return r


def global_meta(smoke=False):
  """The data-matched control (adapt/global_meta.py): the global model's dynamic leaves trained
  on the labelled queries of the FDA's meta devices (meta_devices 0 = fda.meta_devices);
  training length chosen on validation (every eval_every steps), the rate by the evaluator."""
  g = mlc.ConfigDict(dict(
      learning_rates=(1e-3, 3e-3, 1e-2), num_steps=3000, warmup_steps=50, weight_decay=1e-4,
      grad_clip=1.0, devices_per_step=16, meta_devices=0, eval_every=100, log_every=100,
      checkpoint_every=500))
  if smoke:
    g.update(dict(learning_rates=(1e-3,), num_steps=4, warmup_steps=1, devices_per_step=4,
                  eval_every=2, log_every=2, checkpoint_every=2))
  return g


def persona(smoke=False):
  """Persona and DUET (adapt/persona.py) on a classifier's two Dense layers (the adaptive
  layers); ε = edit clip, ε_s = sample-edit clip; K (`prototypes`), the assignment rule and
  the refinement rate and scope are chosen on validation devices. refine_training: Stage C
  also decodes the centres device-scope refinement would serve."""
  p = mlc.ConfigDict(dict(
      layers=("classifier/hidden", "classifier/out"),
      code_dim=32, hidden=64, head_scale=0.1, freeze_heads=False,
      epsilon=1.0, sample_epsilon=0.5, edit_penalty=1e-3,
      prototypes=(2, 5, 8), kmeans_iterations=50, assignment=("nearest", "min_edit"),
      refine_rates=(0.1, 0.3, 0.6), refine_scopes=("population", "device"),
      refine_training=True,
      merge_ratio=0.25,
      meta_devices=12288, meta_query_size=32, devices_per_step=32,
      num_steps=3000, learning_rate=1e-3, warmup_steps=50, weight_decay=1e-4, grad_clip=1.0,
      eval_every=250, log_every=100, checkpoint_every=250))
  # Ablation rows (each trains its own stage): persona_k{K}, persona_single_eps{ε},
  # duet_frozen_heads (the released code's untrained heads).
  p.ablations = mlc.ConfigDict(dict(prototypes=(1, 2, 5, 10), epsilons=(0.25, 4.0),
                                    frozen_heads=True))
  if smoke:
    p.update(dict(code_dim=8, hidden=8, prototypes=(2,), kmeans_iterations=3,
                  refine_rates=(0.3,), meta_devices=8, meta_query_size=4, devices_per_step=4,
                  num_steps=4, warmup_steps=1, eval_every=2, log_every=2, checkpoint_every=2))
    p.ablations.update(dict(prototypes=(1,), epsilons=(0.25,)))
  return p


# ---------- evaluation, deployment, report ------------------------------------------------------

def evaluation():
  """The evaluator: `device_chunk` devices per compiled (vmapped) call."""
  return mlc.ConfigDict(dict(device_chunk=32))


def deploy(smoke=False):
  """Deployment studies after the evaluation (mmpg_jax/deploy): compressed traffic, label-free
  rollback, and (where `policy_method` names a method) request policies over the streams."""
  d = mlc.ConfigDict(dict(
      # the traffic/rollback studies' methods (the headline rows that send something; their
      # ablations and controls are left out for time); () = every method that sends something
      methods=("global_meta", "cdc_mmpg", "cdc_mmpg_on_global_meta"),
      encodings=("float32", "float16", "int8", "int4"),   # () = no traffic study
      codec_tolerance=0.003,            # the default encoding: the smallest within this much
                                        # of float32's validation score (0.3 points)
      int8_model=True,                  # also apply each encoding's edit to an int8 model
      rollback=True,
      policy_method="",                 # "" = no request-policy study
      budgets=(0.05, 0.1, 0.2, 0.5),    # request budgets (share of windows) set on validation
      curve=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),   # budgets the curves are drawn at
      windows_per_hour=1.0))            # a window's duration, for bytes per device-hour
  if smoke:
    d.update(dict(methods=("cdc_mmpg",), encodings=("float32", "int8")))
  return d


def report():
  """What report.md and aggregate compare the methods with."""
  # references: the rows every method is compared against in report.md / aggregate (a row
  # name, or "best_rival": the rival row with the best validation score); ood_rows: the rows
  # whose out-of-distribution claim the report states beside the rows selected on val_ood.
  return mlc.ConfigDict(dict(references=("global", "global_meta", "fta_k5", "best_rival"),
                             ood_rows=("cdc_mmpg",)))
