r"""Moving-digits video QA under device shift: the global model, baselines, forward-only rivals,
the data-matched control global_meta and CDC-MMPG, on test and out-of-distribution (OOD)
devices (30 test, 20 OOD, 20 validation OOD; the README's main job).

Default: the headline rows (below, `arg == ""`) and the deployment studies (traffic and
rollback for global_meta, cdc_mmpg, cdc_mmpg_on_global_meta).
  python -m mmpg_jax.main --config=configs/moving_digits_qa.py --workdir=runs/default
  time: 9.2 min on a 2-core CPU VM (553 s, the deployment studies 50 s of it; data prepared)
  result: accuracy in %, test / OOD, seed 0: global 80.2 / 60.7, fta_k5 84.7 / 70.3, lame
    82.8 / 61.6, global_meta 85.1 / 66.5, cdc_mmpg 84.2 / 65.0, cdc_mmpg_on_global_meta
    86.8 / 69.2 (0 labels, 0 device backward passes), oracle 89.8 / 81.6; 3 seeds with
    paired intervals in docs/results.md ("Comparisons a reviewer can trust"); the FDA rows
    move by about a seed's spread with float rounding (another machine or XLA version)
Study: every row (every FTA budget, ADR selector and K, robustness variant, rival).
  python -m mmpg_jax.main --config=configs/moving_digits_qa.py:study --workdir=runs/qa_study
  time: 17.6 min (1,054 s)
  result: the full table of docs/results.md
Smoke: the study's code path at tiny size.
  python -m mmpg_jax.main --config=configs/moving_digits_qa.py:smoke --workdir=/tmp/smoke
  time: about 2 min
  result: every stage runs end to end; its numbers mean nothing

Override anything from the command line, e.g. --config.train.num_steps=500.
"""
import os

import ml_collections as mlc

from mmpg_jax.core import config_loader

# The shared blocks, loaded by path from this file's folder (configs are not a package).
_HERE = os.path.dirname(os.path.abspath(__file__))
common = config_loader.module("common.py", _HERE)
common_data = config_loader.module("common_data.py", _HERE)

VARIANTS = ("", "study", "smoke")


def get_config(arg: str = ""):
  """arg: '' (the default: headline rows), 'study' (every row) or 'smoke' (tiny, every row:
  the study's code path end to end)."""
  common.check_variant(arg, VARIANTS)
  smoke = arg == "smoke"
  c = mlc.ConfigDict()
  c.benchmark = "moving_digits_qa"
  c.task = "video_qa"
  c.seed = 0
  c.data = common_data.moving_digits_data(smoke)
  c.model = common_data.video_qa_model(smoke)
  c.dynamic_leaves = common_data.VIDEO_QA_DYNAMIC
  c.train = common.train(smoke)
  c.baselines = common.baselines(c.dynamic_leaves, common_data.VIDEO_QA_NORMS, smoke)
  c.tta = common.tta(smoke)
  c.adr = common.adr(smoke)
  c.fda = common.fda(c.dynamic_leaves, smoke)
  c.cdc_robust = common.cdc_robust(common_data.VIDEO_QA_NORMS, smoke)
  c.global_meta = common.global_meta(smoke)
  # Modules under mmpg_jax/adapt/ whose build(ctx) give the methods, in the report's order.
  c.method_families = ("baselines", "global_meta", "tta", "cdc_mmpg", "cdc_robust")
  common.run_blocks(c, smoke)
  if arg == "":
    # The headline rows: global, fta_k5, prior_em, tent and the oracle; every forward-only
    # rival (T3A, LAME, FOA); global_meta and the FDA that edits it (fda.bases); cdc_mmpg with
    # two anchor ablations; one robustness variant beside the mean-, noisy-mean- and
    # nearest-edit controls.
    common.headline(c)
    # Nystrom herding (32 landmarks): the device's marginal 8.3 MFLOP, level with fta_k5's
    # cheapest budget (8.0, 5 steps) and a quarter of its validation choice (32.1, 20 steps)
    # (bench: device_adaptation); exact herding and random anchors as its ablations.
    c.adr.update(dict(selector="herding_ny32", ablations=("herding", "random"), k_sweep=()))
    # em2: its grid chosen on the validation OOD devices
    c.cdc_robust.variants = ("em2", "mean_edit", "noisy_mean_edit", "nearest_edit")
    # 4,096 fresh meta devices instead of 6,144 (the rest of meta-training as the study's):
    # the pool's encoding is the slowest stage.
    c.fda.meta_devices = 4096
  return c
