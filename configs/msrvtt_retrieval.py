r"""MSRVTT text-to-video retrieval on pre-extracted CLIP frame features: the 9k training list
and the 1k-A test pairs; devices are MSRVTT's 20 video categories. The moving-digits
retrieval main job, methods and protocol (every row) on real data. A device's gallery is its
own query videos (the 1k-A pairs of its category, `data.query_size` of them, one caption
each), so R@1 here is within a 12-video gallery, not the 1,000-video one of the published
protocol.

Default (every row):
  python -m mmpg_jax.main --config=configs/msrvtt_retrieval.py \
      --config.data.manual_dir=/data/msrvtt --workdir=runs/msrvtt_retrieval
  time: not measured (no real files or accelerator here); expect well under an hour on one
    GPU or TPU host
  result: not measured; published 1k-A R@1: zero-shot CLIP ViT-B/32 about 31, a mean-pooling
    head on frozen CLIP frame features about 31, fully fine-tuned CLIP4Clip 43.1; within a
    device's small gallery the figures are higher: read the per-device gains over `global`
Smoke, on fixture files in the upstream formats:
  python -m mmpg_jax.data.video_fixtures --out=/tmp/mmpg_jax_video_fixtures
  python -m mmpg_jax.main --config=configs/msrvtt_retrieval.py:smoke --workdir=/tmp/smoke_msrvtt_r
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
  c.benchmark = "msrvtt_retrieval"
  c.task = "video_retrieval"
  c.seed = 0
  c.data = common_data.real_video_data("msrvtt_retrieval", smoke)
  # 1k-A has ~50 test videos a category on average, fewer in small ones: a gallery of 12
  # per device; a category too small is refused before any work, naming it
  c.data.update(dict(query_size=3 if smoke else 12, support_size=5 if smoke else 10,
                     context_size=4 if smoke else 16, oracle_size=3 if smoke else 32))
  common.video_retrieval(c, common_data, smoke, frame_features=True)
  # No shift parameters to widen on real data (no `wide`), no label groups for em2.
  c.cdc_robust.variants = ("gate", "cloud_tent", "mean_edit", "noisy_mean_edit", "nearest_edit")
  # Modules under mmpg_jax/adapt/ whose build(ctx) give the methods, in the report's order
  # (T3A, LAME, FOA need classes: none here).
  c.method_families = ("baselines", "global_meta", "cdc_mmpg", "cdc_robust")
  common.run_blocks(c, smoke)
  common.real_video(c, smoke)
  return c
