"""Data and model blocks the experiment configs share (configs/common.py has the training,
method, evaluation and report blocks).

Loaded by path like every config (mmpg_jax/config_loader.module), never imported as a package.
Each function returns a fresh ml_collections.ConfigDict: a config changes what it gets freely.
`smoke=True` gives the tiny sizes of the `smoke` variants (every stage end to end, in minutes).
"""
import os
import tempfile

import ml_collections as mlc

# ---------- the models' leaves ------------------------------------------------------------------
# `dynamic`: the leaves an edit (or on-device fine-tuning) may change; the encoders stay static.
# `norms`: the normalisation leaves TENT adapts (and cdc_robust's cloud_tent).
# The video QA model (models/video_lmm).
VIDEO_QA_DYNAMIC = ("temporal/.*", "fusion/.*", "answer_head/.*")
VIDEO_QA_NORMS = ("fusion/norm/.*", "answer_head/norm/.*")
# The video retrieval model: both sides of the joint space and the temperature.
VIDEO_RETRIEVAL_DYNAMIC = ("temporal/.*", "video_head/.*", "text_head/.*", "logit_scale")
VIDEO_RETRIEVAL_NORMS = ("video_head/norm/.*", "text_head/norm/.*")
# A classifier on an encoder (drifting digits' CNN, seqrec's user encoder).
CLASSIFIER_DYNAMIC = ("classifier/.*",)
CLASSIFIER_NORMS = ("classifier/norm/.*",)
CLASSIFIER_FOA = ("classifier/out/bias", "classifier/norm/bias")   # digits: 10 + 64 offsets


# ---------- moving digits (the embedded video benchmark) ---------------------------------------

def shift_ranges(**overrides):
  """Ranges a device's shift parameters are drawn from (moving_digits.sample_shift)."""
  c = mlc.ConfigDict(dict(
      rotation=(0.0, 45.0),            # |degrees|, random sign per device
      thickness=(-1, 0, 1, 2),         # erode 1 / none / dilate 1 / dilate 2
      invert_prob=0.3,                 # contrast inversion
      clutter_fragments=3,             # static per-device background of digit fragments
      clutter_alpha=(0.0, 0.6),
      noise=(0.0, 0.35),               # Gaussian pixel noise sigma
      blur=(0.0, 0.0),                 # Gaussian blur sigma (none in training)
      label_concentration=0.3,         # Dirichlet label prior over the 10 digits
      motion_preferred_prob=0.7,       # one preferred direction, the rest share the remainder
      question_concentration=2.0,      # Dirichlet question mix over question types
  ))
  c.update(overrides)
  return c


def moving_digits_data(smoke=False):
  """The moving-digits videos, questions and captions (data/moving_digits.py), with the
  training, OOD and validation OOD shifts: the QA and the retrieval configs' data."""
  d = mlc.ConfigDict(dict(
      name="moving_digits", seed=0, frames=8, size=32, speed=1, rotation_jitter=10.0,
      question_len=8, caption_len=6,
      num_global_devices=150, global_videos_per_device=64,
      num_val_devices=30, num_test_devices=30, num_ood_devices=20, num_val_ood_devices=20,
      context_size=32, support_size=10, query_size=96, oracle_size=160,
      caption_concentration=0.3,       # Dirichlet mix of a device's caption phrasings
      # The cloud's captions: mostly the first two phrasings (moving_digits.CAPTION_TEMPLATES),
      # so a device that phrases its queries otherwise shifts the text side.
      cloud_caption_mix=(0.6, 0.38, 0.005, 0.005, 0.005, 0.005),
      # ... and words digits and directions the plain way (md.DIGIT_FORMS, DIRECTION_FORMS):
      # numerals, "-ward" and compass words are a device's own vocabulary.
      cloud_digit_forms=(0.99, 0.01), cloud_direction_forms=(0.99, 0.005, 0.005),
      data_dir="",                      # "" = $MMPG_DATA_DIR or ~/.cache/mmpg_jax/tfds
  ))
  d.shift = shift_ranges()
  # Out-of-distribution devices: rotation beyond the training range, blur (never seen in
  # training), more clutter and noise above the training range.
  d.ood_shift = shift_ranges(rotation=(50.0, 65.0), blur=(0.5, 0.8), clutter_fragments=4,
                             clutter_alpha=(0.3, 0.6), noise=(0.35, 0.45))
  # Validation OOD devices (data.num_val_ood_devices): a held-out shift family of their own,
  # disjoint from the test OOD group's (stroke thickness beyond training's: faint and heavy;
  # the text side, phrasings of their own): every robustness choice is made on them, never
  # on the test OOD group.
  d.val_ood_shift = shift_ranges(thickness=(-2, 3))
  if smoke:
    d.update(dict(num_global_devices=6, global_videos_per_device=16, num_val_devices=3,
                  num_test_devices=3, num_ood_devices=2, num_val_ood_devices=2,
                  context_size=8, support_size=10, query_size=8, oracle_size=12))
  return d


# ---------- real video datasets (pre-extracted CLIP frame features) -----------------------------

def real_video_data(name: str, smoke=False):
  """The data block of a real video dataset (data/real_video.py: files you place, nothing
  downloaded); `smoke`: the fixture files of mmpg_jax.data.video_fixtures."""
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


# ---------- video models ----------------------------------------------------------------------
# frame_features=True: on pre-extracted frame features (the real video datasets), a linear
# projection replaces the frame CNN, at the real data's sizes.

def video_qa_model(smoke=False, frame_features=False):
  """The video QA model (models/video_lmm)."""
  m = mlc.ConfigDict(dict(name="video_lmm", frame_channels=(16, 32, 32), embed_dim=64,
                          question_dim=32, head_hidden=128))
  if smoke:
    m.update(dict(frame_channels=(4, 8, 8), embed_dim=16, question_dim=8, head_hidden=16))
  if frame_features:
    m.update(dict(frame_encoder_kind="projection", frame_channels=()))
    if not smoke:
      m.update(dict(embed_dim=256, question_dim=128, head_hidden=512))
  return m


def video_retrieval_model(smoke=False, frame_features=False):
  """The text-to-video retrieval model (a joint video-text space)."""
  m = mlc.ConfigDict(dict(name="video_retrieval", frame_channels=(16, 32, 32), embed_dim=64,
                          text_dim=32, joint_dim=64, head_hidden=128))
  if smoke:
    m.update(dict(frame_channels=(4, 8, 8), embed_dim=16, text_dim=8, joint_dim=8,
                  head_hidden=16))
  if frame_features:
    m.update(dict(frame_encoder_kind="projection", frame_channels=()))
    if not smoke:
      m.update(dict(embed_dim=256, text_dim=128, joint_dim=256, head_hidden=512))
  return m
