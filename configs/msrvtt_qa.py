r"""MSRVTT-QA on pre-extracted CLIP frame features: devices are MSRVTT's 20 video categories
(10 global, 4 meta, 2 validation, 4 test; seeded, disjoint; no OOD group). The moving-digits
QA main job, methods and protocol (every row) on real data (data/real_video.py: files you
place as WORKSPACE.md "Real video datasets" says, nothing downloaded), with a linear
projection of the features as the frame encoder.

Default (every row):
  python -m mmpg_jax.main --config=configs/msrvtt_qa.py \
      --config.data.manual_dir=/data/msrvtt_qa --workdir=runs/msrvtt_qa
  time: not measured (no real files or accelerator here); expect well under an hour on one
    GPU or TPU host, the data build (reading ~10k feature files) in minutes
  result: not measured; published accuracy (all test questions, OOV answers wrong): HCRN 35.6
    (appearance and motion features), FrozenBiLM 47.0 (CLIP features, frozen language
    model); expect `global` near the lower figure and read the per-device gains over it
    (oracle - global is the margin)
Smoke, on fixture files in the upstream formats:
  python -m mmpg_jax.data.video_fixtures --out=/tmp/mmpg_jax_video_fixtures
  python -m mmpg_jax.main --config=configs/msrvtt_qa.py:smoke --workdir=/tmp/smoke_msrvtt_qa
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
  c.benchmark = "msrvtt_qa"
  c.task = "video_qa"
  c.seed = 0
  c.data = common_data.real_video_data("msrvtt_qa", smoke)
  return common.real_video_qa(c, common_data, smoke)

