r"""MSRVTT-QA on pre-extracted CLIP frame features: devices are MSRVTT's 20 video categories.

The same main job, methods and protocol as the moving-digits QA config, which this one starts
from; what differs is the data (data/real_video.py: files you place, nothing downloaded), the
frame encoder (a linear projection of the features) and the sizes. Place the files as
WORKSPACE.md ("Real video datasets") says, then:
  python -m mmpg_jax.main --config=configs/msrvtt_qa.py \
      --config.data.manual_dir=/data/msrvtt_qa --workdir=runs/msrvtt_qa
Smoke, on fixture files in the upstream formats (about 2 min on 2 CPU cores):
  python -m mmpg_jax.data.video_fixtures --out=/tmp/mmpg_jax_video_fixtures
  python -m mmpg_jax.main --config=configs/msrvtt_qa.py:smoke --workdir=/tmp/smoke_msrvtt_qa

Runtime and figures of the default run are not measured yet: this workspace has neither the
real files nor an accelerator. On one GPU or TPU host expect the data build (reading ~10k
feature files) in minutes and the run in well under an hour (the default moving-digits run,
a model of the same shape, takes 13 min on 2 CPU cores). For orientation, published accuracy
on MSRVTT-QA (all test questions, OOV answers wrong): HCRN 35.6 on appearance and motion
features, FrozenBiLM 47.0 with CLIP features and a frozen language model. This device model is
small, so expect `global` near the lower figure; the point is the per-device gain each method
adds on top (oracle - global is the margin; it can be measured only with the real files).
Devices: 10 global, 4 meta, 2 validation, 4 test categories (seeded, disjoint); there is no
OOD group.
"""
import os
import tempfile

import ml_collections as mlc

from mmpg_jax import config_loader


def real_video_data(name: str, smoke: bool) -> mlc.ConfigDict:
  """The data block of a real video dataset (data/real_video.py); `smoke`: the fixtures."""
  d = mlc.ConfigDict(dict(
      name=name, manual_dir="",         # the folder with the dataset's files (WORKSPACE.md)
      features="features",              # DIR/features/<video_id>.npy, or "features.npz"
      feature_dim=512,                  # CLIP ViT-B/32; 768 for ViT-L/14
      frames=12,                        # T: shorter videos padded with a mask, longer sampled
      question_len=16, caption_len=24, num_answers=1000, vocab_size=8000,
      num_devices=20,                   # k-means clusters (MSVD only; MSRVTT has categories)
      num_global_devices=10, num_meta_devices=4, num_val_devices=2, num_test_devices=4,
      num_ood_devices=0,                # no OOD group on real data
      # per device; a category too small for them is refused before any work, by name
      context_size=32, support_size=10, query_size=64, oracle_size=256,
      seed=0, data_dir=""))
  if smoke:
    d.update(dict(manual_dir=os.path.join(tempfile.gettempdir(), "mmpg_jax_video_fixtures",
                                          name),
                  feature_dim=16, frames=4, question_len=8, caption_len=8, num_answers=20,
                  vocab_size=64, num_devices=6, num_global_devices=2, num_meta_devices=1,
                  num_val_devices=1, num_test_devices=2, context_size=6, support_size=5,
                  query_size=4, oracle_size=8))
  return d


def real_video_model(d, smoke: bool) -> dict:
  """Model sizes on frame features (a projection replaces the CNN)."""
  if smoke:
    return dict(frame_encoder_kind="projection", frame_channels=(), embed_dim=16)
  return dict(frame_encoder_kind="projection", frame_channels=(), embed_dim=256)


def get_config(arg: str = ""):
  smoke = arg == "smoke"
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config variant {arg!r}; use '' or 'smoke'")
  # Every row of the embedded benchmark's study: a real dataset is run for the full table.
  c = config_loader.load("moving_digits_qa.py", arg or "study",
                         os.path.dirname(os.path.abspath(__file__)))
  c.benchmark = "msrvtt_qa"
  c.task = "video_qa"
  c.data = real_video_data("msrvtt_qa", smoke)
  c.model.update(real_video_model(c.data, smoke))
  if not smoke:
    c.model.update(dict(question_dim=128, head_hidden=512))
    # meta devices resample 4 categories: fewer than moving digits' fresh 6,144 (host memory
    # of the encoded pool: 48 samples x 12 frames x 256 floats each)
    c.fda.meta_devices = 2048
    c.train.update(dict(num_steps=6000, batch_size=256, learning_rate=1e-3, log_every=200,
                        checkpoint_every=500))
  # One label group (the answer vocabulary) and no question types: asked questions only.
  c.baselines.prior_em.variants = ("asked",)
  c.tta.foa.leaves = ("fusion/norm/bias",)      # CMA-ES over 1,000 answer biases: too many
  # No shift parameters to widen on real data: every variant but `wide`.
  c.cdc_robust.variants = ("em2", "gate", "cloud_tent", "mean_edit", "noisy_mean_edit",
                           "nearest_edit")
  if smoke:
    c.baselines.fta.ks = (2,)
  return c
