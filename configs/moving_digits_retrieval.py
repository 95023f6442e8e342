r"""Moving-digits text-to-video retrieval under device shift: the second task.

The same benchmark's videos, with captions phrased per device (the OOD group with phrasings
never used in training); the same main job, methods and protocol as the QA config, which this
one starts from (data, training and CDC-MMPG settings are shared; only what differs is set).

Default: the headline rows (moving_digits_qa.headline, with retrieval's robustness variant,
cloud_tent, chosen on validation OOD devices; QB-Norm and dual softmax as the rivals; the
data-matched control global_meta and the FDA that edits it), 654 s on this 2-core CPU machine
(seed 2, 2026-12-07, mostly alone; 1,040-1,070 s with a second run beside it), plus the
deployment studies: 43 s with a second run beside it (seed 0, 2026-12-07):
  python -m mmpg_jax.main --config=configs/moving_digits_retrieval.py --workdir=runs/retrieval
Study: every row (two more FDAs and the router of the robustness variants), 1,781 s on the
machine of 2026-11-30:
  python -m mmpg_jax.main --config=configs/moving_digits_retrieval.py:study --workdir=runs/rs
Smoke (the study's code path, tiny), under 1.5 min alone:
  python -m mmpg_jax.main --config=configs/moving_digits_retrieval.py:smoke --workdir=/tmp/smoke_r
Opt-in `cdc_mmpg_wide_text` (text-side domain randomisation; one more FDA, ~10 min):
  --config.cdc_robust.variants='("em2","gate","cloud_tent","wide","wide_text","routed",
                                 "ensemble","mean_edit","noisy_mean_edit","nearest_edit")'

Expected result of the default run (seed 0, this machine, 30 test / 20 OOD devices, R@1 in
%, ties counted against the query): test global 78.4, fta_k5 78.8, qb_norm 77.7, dsl 80.2,
global_meta 90.5, cdc_mmpg 88.2, cdc_mmpg_on_global_meta 91.9, oracle 89.9, with 0 labels and 0
device backward passes for every cdc_mmpg row; OOD global 51.1, dsl 55.6, global_meta 38.6,
cdc_mmpg 45.6, cdc_mmpg_cloud_tent (validation OOD's choice) 44.5, oracle 81.9. The 3-seed
table with paired intervals is in docs/results.md. The smoke run only checks that every stage
runs end to end.
"""
import os

import ml_collections as mlc

from mmpg_jax import config_loader


def get_config(arg: str = ""):
  c = config_loader.load("moving_digits_qa.py", arg, os.path.dirname(os.path.abspath(__file__)))
  smoke = arg == "smoke"
  c.benchmark = "moving_digits_retrieval"
  c.task = "video_retrieval"
  c.model = mlc.ConfigDict(dict(name="video_retrieval", frame_channels=(16, 32, 32),
                                embed_dim=64, text_dim=32, joint_dim=64, head_hidden=128))
  # Edited leaves: both sides of the joint space and the temperature; the encoders are static.
  c.dynamic_leaves = ("temporal/.*", "video_head/.*", "text_head/.*", "logit_scale")
  c.baselines.fta.leaves = c.dynamic_leaves
  c.baselines.oracle.leaves = c.dynamic_leaves
  c.baselines.tent.leaves = ("video_head/norm/.*", "text_head/norm/.*")
  c.cdc_robust.cloud_leaves = c.baselines.tent.leaves
  # InfoNCE on 160 pairs wants more steps than cross-entropy does (chosen on validation).
  c.baselines.oracle.update(dict(learning_rates=(1e-3, 3e-3, 1e-2), steps=(100, 300)))
  # The forward-only rivals of retrieval: querybank normalisation (dynamic inverted softmax
  # over 1,024 of the cloud's training queries; its inverse temperature) and dual softmax
  # (its temperature), chosen on validation devices.
  c.baselines.qb_norm = mlc.ConfigDict(dict(inverse_temperatures=(0.3, 1.0, 3.0, 10.0),
                                            bank_size=1024,
                                            dsl_temperatures=(0.3, 1.0, 3.0, 10.0)))
  c.fda.edit_leaves = c.dynamic_leaves
  c.fda.meta_query_size = 32            # InfoNCE over a meta device's 32 query pairs
  if arg == "":
    # The headline rows (moving_digits_qa.headline) with retrieval's validation-selected
    # robustness variant: cloud_tent, the highest label-free row on the validation devices
    # (3 seeds); em2 needs label groups, which retrieval has not.
    c.cdc_robust.variants = ("cloud_tent", "mean_edit", "noisy_mean_edit", "nearest_edit")
    # Exact herding: Nystrom herding's Cholesky factorisations, one per modality and K in one
    # compiled meta-pool program, hung the XLA CPU runtime here (config checks refuse it).
    c.adr.update(dict(selector="herding", ablations=("random",)))
  if smoke:
    c.model.update(dict(frame_channels=(4, 8, 8), embed_dim=16, text_dim=8, joint_dim=8,
                        head_hidden=16))
    c.baselines.qb_norm.update(dict(inverse_temperatures=(0.3,), bank_size=32,
                                    dsl_temperatures=(1.0,)))
    c.baselines.oracle.update(dict(learning_rates=(1e-2,), steps=(3,)))
    c.fda.meta_query_size = 4
  return c
