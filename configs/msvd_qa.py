r"""MSVD-QA on pre-extracted CLIP frame features: devices are 20 k-means clusters of the
videos' mean frame embeddings (MSVD has no categories; fit on the training split's videos,
recorded in the build summary). The same blocks as configs/msrvtt_qa.py but for the data.

Default (every row):
  python -m mmpg_jax.main --config=configs/msvd_qa.py \
      --config.data.manual_dir=/data/msvd_qa --workdir=runs/msvd_qa
  time: not measured (no real files or accelerator here); expect well under an hour on one
    GPU or TPU host (1,970 videos)
  result: not measured; published MSVD-QA accuracy: HCRN 36.1, FrozenBiLM 54.8 (CLIP
    features, frozen language model); expect `global` near the lower figure and read the
    per-device gains over it
Smoke, on fixture files in the upstream formats (features as one .npz):
  python -m mmpg_jax.data.video_fixtures --out=/tmp/mmpg_jax_video_fixtures
  python -m mmpg_jax.main --config=configs/msvd_qa.py:smoke --workdir=/tmp/smoke_msvd_qa
  time: about 2 min on 2 CPU cores
  result: every stage runs end to end; its numbers mean nothing
"""
import os

import ml_collections as mlc

from mmpg_jax.core import config_loader

# The shared blocks, loaded by path from this file's folder (configs are not a package).
_HERE = os.path.dirname(os.path.abspath(__file__))
common = config_loader.module("common.py", _HERE)
common_data = config_loader.module("common_data.py", _HERE)

VARIANTS = ("", "smoke")


def get_config(arg: str = ""):
  """arg: '' (every row: a real dataset is run for the full table) or 'smoke' (tiny, on the
  fixture files)."""
  common.check_variant(arg, VARIANTS)
  smoke = arg == "smoke"
  c = mlc.ConfigDict()
  c.benchmark = "msvd_qa"
  c.task = "video_qa"
  c.seed = 0
  c.data = common_data.real_video_data("msvd_qa", smoke)
  if smoke:
    c.data.features = "features.npz"
  else:
    # MSVD-QA: 6,415 val and 13,157 test questions, ~320 / ~660 a cluster on average (uneven)
    c.data.update(dict(query_size=64, oracle_size=128))
  c.model = common_data.video_qa_model(smoke, frame_features=True)
  c.dynamic_leaves = common_data.VIDEO_QA_DYNAMIC
  c.train = common.train(smoke)
  c.baselines = common.baselines(c.dynamic_leaves, common_data.VIDEO_QA_NORMS, smoke)
  # One label group (the answer vocabulary) and no question types: asked questions only.
  c.baselines.prior_em.variants = ("asked",)
  # FOA's offsets: CMA-ES over the 1,000 answer biases would be too many
  c.tta = common.tta(smoke, foa_leaves=("fusion/norm/bias",))
  c.adr = common.adr(smoke)
  c.fda = common.fda(c.dynamic_leaves, smoke)
  c.cdc_robust = common.cdc_robust(common_data.VIDEO_QA_NORMS, smoke)
  # No shift parameters to widen on real data: no `wide` (nor what builds on it).
  c.cdc_robust.variants = ("em2", "gate", "cloud_tent", "mean_edit", "noisy_mean_edit",
                           "nearest_edit")
  c.global_meta = common.global_meta(smoke)
  # Modules under mmpg_jax/adapt/ whose build(ctx) give the methods, in the report's order.
  c.method_families = ("baselines", "global_meta", "tta", "cdc_mmpg", "cdc_robust")
  c.eval = common.evaluation()
  c.comm_dtype = "float32"              # dtype of what crosses the network
  c.deploy = common.deploy(smoke)
  c.report = common.report()
  common.real_video(c, smoke)
  return c
