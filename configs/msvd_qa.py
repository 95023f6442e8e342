r"""MSVD-QA on pre-extracted CLIP frame features: devices are 20 k-means clusters of the
videos' mean frame embeddings (MSVD has no categories; fit on the training split's videos,
recorded in the build summary). Everything else as configs/msrvtt_qa.py, which this one
starts from.
  python -m mmpg_jax.main --config=configs/msvd_qa.py \
      --config.data.manual_dir=/data/msvd_qa --workdir=runs/msvd_qa
Smoke, on fixture files in the upstream formats (features as one .npz; about 2 min):
  python -m mmpg_jax.data.video_fixtures --out=/tmp/mmpg_jax_video_fixtures
  python -m mmpg_jax.main --config=configs/msvd_qa.py:smoke --workdir=/tmp/smoke_msvd_qa

Not measured yet (no real files, no accelerator here); on one GPU or TPU host expect well under
an hour (1,970 videos). For orientation, published MSVD-QA accuracy: HCRN 36.1, FrozenBiLM 54.8
(CLIP features, frozen language model); expect `global` near the lower figure and read the
per-device gains over it.
"""
import os

from mmpg_jax import config_loader


def get_config(arg: str = ""):
  c = config_loader.load("msrvtt_qa.py", arg, os.path.dirname(os.path.abspath(__file__)))
  c.benchmark = "msvd_qa"
  with c.unlocked():
    c.data.name = "msvd_qa"
    c.data.manual_dir = c.data.manual_dir.replace("msrvtt_qa", "msvd_qa")
  if arg != "smoke":
    # MSVD-QA: 6,415 val and 13,157 test questions, ~320 / ~660 a cluster on average (uneven)
    c.data.update(dict(query_size=64, oracle_size=128))
  else:
    c.data.features = "features.npz"
  return c
