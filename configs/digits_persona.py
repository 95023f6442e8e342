r"""Drifting digits: image classification under real-time device shift.

Each device is a stream of windows whose shift (label prior, rotation, clutter, noise, blur,
stroke, occasionally a jump to a fresh shift) drifts from window to window; every method
adapts once per window and the report gives accuracy per window position. The training,
baseline, test-time-adaptation and CDC-MMPG settings start from the video QA config (loaded,
not copied); what differs is set here.

Default: the headline rows (no K sweep, one anchor ablation, T3A/LAME/FOA, the data-matched
control global_meta and the FDA that edits it, Persona at K = 2, DUET's released form beside
ours), 949-1,028 s on this 2-core CPU machine with a second run beside it (seed 0-2,
2026-12-07; the earlier headline, without the controls and rivals, took 446 s alone), plus
the deployment studies (traffic and rollback for the five headline edit rows, request
policies for Persona): 90-97 s with a second run beside it:
  python -m mmpg_jax.main --config=configs/digits_persona.py --workdir=runs/digits
Study: every row (K sweep, both anchor ablations, T3A/LAME/FOA, Persona's K grid and its
ablations: ten meta-trained stages), ~12.5 min (742 s measured on the machine of 2026-11-23):
  python -m mmpg_jax.main --config=configs/digits_persona.py:study --workdir=runs/digits_study
Smoke (the study's code path, tiny), about 1.5 min:
  python -m mmpg_jax.main --config=configs/digits_persona.py:smoke --workdir=/tmp/smoke_d

Expected result of the default run (seed 0, this machine, accuracy in %, test / OOD): global
61.8 / 26.2, fta_k5 68.4 / 39.7, lame 68.2 / 27.8, global_meta 68.2 / 31.0, cdc_mmpg 77.0 /
37.1, cdc_mmpg_on_global_meta 77.8 / 37.7, duet 77.5 / 40.7, persona 77.6 / 40.0,
duet_frozen_heads 66.2 / 27.2, persona_min_edit 62.4 / 30.3, oracle 79.8 / 56.7. The 3-seed
table with paired intervals is in docs/results.md "Comparisons a reviewer can trust". The
smoke run only checks that every stage runs end
to end; its numbers mean nothing.
"""
import os

import ml_collections as mlc

from mmpg_jax import config_loader


def get_config(arg: str = ""):
  qa = config_loader.module("moving_digits_qa.py", os.path.dirname(os.path.abspath(__file__)))
  c = qa.get_config(arg)
  smoke = arg == "smoke"
  c.benchmark = "drifting_digits"
  c.task = "image_classification"
  c.data = mlc.ConfigDict(dict(
      name="drifting_digits", seed=0, size=28, rotation_jitter=10.0, jitter=2,
      num_global_devices=150, global_images_per_device=64,
      num_val_devices=30, num_test_devices=30, num_ood_devices=20, num_val_ood_devices=20,
      # per window
      context_size=32, support_size=10, query_size=48, oracle_size=96,
      data_dir="",                      # "" = $MMPG_DATA_DIR or ~/.cache/mmpg_jax/tfds
  ))
  # The same shift families and ranges as the video benchmark (a single image per sample).
  c.data.shift = qa.shift_ranges()
  # OOD: beyond the training ranges as in the video benchmark, a little milder (a single
  # 20x20 digit has no frames to average over: rotation 50-65° with blur 0.5-0.8 left the
  # global model at 21% and the oracle at 44%).
  c.data.ood_shift = qa.shift_ranges(rotation=(50.0, 60.0), blur=(0.4, 0.6),
                                     clutter_fragments=4, clutter_alpha=(0.3, 0.6),
                                     noise=(0.35, 0.42))
  # Validation OOD streams: the video benchmark's held-out family (stroke: faint and heavy),
  # disjoint from the test OOD group's; robustness choices are made on them.
  c.data.val_ood_shift = qa.shift_ranges(thickness=(-2, 3))
  # How a device's shift moves from one window to the next (drifting_digits.drift_step).
  c.data.drift = mlc.ConfigDict(dict(
      windows=6,
      jump_prob=0.15,                   # the whole shift redrawn from the split's ranges
      label_rate=0.3,                   # label prior: stationary Dirichlet, correlation 1-r
      rotation_step=6.0, noise_step=0.04, blur_step=0.05, clutter_strength_step=0.08,
      thickness_prob=0.2))              # stroke thickness moves by one

  c.model = mlc.ConfigDict(dict(name="digit_cnn", channels=(16, 32, 32), embed_dim=64,
                                head_hidden=64))
  # The classifier is what edits and fine-tuning change; the CNN encoder stays static.
  c.dynamic_leaves = ("classifier/.*",)
  if not smoke:
    c.train.update(dict(num_steps=1500, batch_size=128))
  c.baselines.fta.leaves = c.dynamic_leaves
  c.baselines.oracle.leaves = c.dynamic_leaves
  c.baselines.tent.leaves = ("classifier/norm/.*",)
  c.baselines.prior_em.variants = ("all",)       # one label group: 'asked' is the same
  c.tta.foa.leaves = ("classifier/out/bias", "classifier/norm/bias")   # 10 + 64 offsets
  c.fda.edit_leaves = c.dynamic_leaves
  c.fda.meta_query_size = 32
  # Full deltas for the classifier's kernels (64x64, 64x10): rank-2 edits of the 64x64 kernel
  # capped the FDA at 71.9% validation accuracy (seed 0), full ones reach 76.6%, and Persona
  # and DUET edit the layers at full rank too.
  c.fda.full_delta_max = 5000
  if not smoke:
    c.fda.meta_devices = 12288          # as many meta-training windows as Persona and DUET see
  c.cdc_robust.variants = ("mean_edit", "noisy_mean_edit", "nearest_edit")
  c.cdc_robust.cloud_leaves = c.baselines.tent.leaves
  c.adr.update(dict(k=8, k_sweep=(2, 8, 32), ablations=("random", "all")))
  if arg == "":                         # the headline rows: one anchor ablation, no K sweep
    # Exact herding: the Nystrom default of the video tasks is not measured on this task.
    c.adr.update(dict(selector="herding", k_sweep=(), ablations=("random",)))
  # Persona and DUET (adapt/persona.py): the classifier's two Dense layers are the adaptive
  # layers; ε = edit clip, ε_s = sample-edit clip; K (`prototypes`), the assignment rule and
  # the refinement rate and scope are chosen on validation devices. refine_training: Stage C
  # also decodes the centres device-scope refinement would serve (adapt/persona.py).
  c.persona = mlc.ConfigDict(dict(
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
  c.persona.ablations = mlc.ConfigDict(dict(prototypes=(1, 2, 5, 10), epsilons=(0.25, 4.0),
                                            frozen_heads=True))
  if arg == "":
    # The headline rows: the ablations are the study's, and K = 2 prototypes, validation's
    # choice on every seed of the study (each K is its own meta-trained stage, ~1 min here).
    # DUET's released form (untrained heads) stays beside ours: one more ~1 min stage.
    c.persona.ablations.update(dict(prototypes=(), epsilons=(), frozen_heads=True))
    c.persona.prototypes = (2,)
  c.global_meta.devices_per_step = 32   # the FDA's 12,288 meta windows, 32 queries each
  c.method_families = ("baselines", "global_meta", "tta", "cdc_mmpg", "cdc_robust", "persona")
  # When to ask: request policies over the drifting streams, for Persona's edits.
  c.deploy.policy_method = "persona"
  c.deploy.methods = (("persona",) if smoke else
                      ("global_meta", "cdc_mmpg", "cdc_mmpg_on_global_meta", "duet", "persona"))

  if smoke:
    c.data.update(dict(num_global_devices=6, global_images_per_device=32, num_val_devices=3,
                       num_test_devices=3, num_ood_devices=2, num_val_ood_devices=2, context_size=8, support_size=10,
                       query_size=8, oracle_size=12))
    c.data.drift.windows = 3
    c.model.update(dict(channels=(4, 8, 8), embed_dim=16, head_hidden=16))
    c.fda.meta_query_size = 4
    c.adr.update(dict(k=2, k_sweep=(2,), ablations=("random", "all")))
    c.persona.update(dict(code_dim=8, hidden=8, prototypes=(2,), kmeans_iterations=3,
                          refine_rates=(0.3,), meta_devices=8, meta_query_size=4,
                          devices_per_step=4, num_steps=4, warmup_steps=1, eval_every=2,
                          log_every=2, checkpoint_every=2))
    c.persona.ablations.update(dict(prototypes=(1,), epsilons=(0.25,)))
  return c
