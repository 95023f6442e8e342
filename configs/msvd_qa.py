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
  return common.real_video_qa(c, common_data, smoke)

