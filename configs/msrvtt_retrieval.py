r"""MSRVTT text-to-video retrieval on pre-extracted CLIP frame features: the 9k training list
and the 1k-A test pairs; devices are MSRVTT's 20 video categories.

The same main job, methods and protocol as the moving-digits retrieval config, which this one
starts from. A device's gallery is its own query videos (the 1k-A pairs of its category,
`data.query_size` of them, one caption each), so R@1 here is within a 12-video gallery, not
the 1,000-video one of the published protocol.
  python -m mmpg_jax.main --config=configs/msrvtt_retrieval.py \
      --config.data.manual_dir=/data/msrvtt --workdir=runs/msrvtt_retrieval
Smoke, on fixture files in the upstream formats (about 2 min on 2 CPU cores):
  python -m mmpg_jax.data.video_fixtures --out=/tmp/mmpg_jax_video_fixtures
  python -m mmpg_jax.main --config=configs/msrvtt_retrieval.py:smoke --workdir=/tmp/smoke_msrvtt_r

Not measured yet (no real files, no accelerator here); on one GPU or TPU host expect well under
an hour. For orientation, published 1k-A R@1: zero-shot CLIP ViT-B/32 about 31, a mean-pooling
head on frozen CLIP frame features about 31, fully fine-tuned CLIP4Clip 43.1. Within a device's
small gallery the figures are higher; read the per-device gains over `global`.
"""
import os

from mmpg_jax import config_loader


def get_config(arg: str = ""):
  smoke = arg == "smoke"
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_loader.load("moving_digits_retrieval.py", arg or "study", here)
  qa = config_loader.load("msrvtt_qa.py", arg, here)
  c.benchmark = "msrvtt_retrieval"
  c.data = qa.data
  with c.data.unlocked():
    c.data.name = "msrvtt_retrieval"
    c.data.manual_dir = c.data.manual_dir.replace("msrvtt_qa", "msrvtt_retrieval")
  # 1k-A has ~50 test videos a category on average, fewer in small ones: a gallery of 12
  # per device; a category too small is refused before any work, naming it
  c.data.update(dict(query_size=3 if smoke else 12, support_size=5 if smoke else 10,
                     context_size=4 if smoke else 16, oracle_size=3 if smoke else 32))
  c.model.update(dict(frame_encoder_kind="projection", frame_channels=()))
  if not smoke:
    c.model.update(dict(embed_dim=256, text_dim=128, joint_dim=256, head_hidden=512))
    c.train.update(dict(num_steps=6000, batch_size=256, learning_rate=1e-3, log_every=200,
                        checkpoint_every=500))
    c.fda.meta_devices = 2048           # resamples of 4 categories (see msrvtt_qa.py)
  else:
    c.baselines.fta.ks = (2,)
  c.cdc_robust.variants = ("gate", "cloud_tent", "mean_edit", "noisy_mean_edit", "nearest_edit")
  # T3A, LAME, FOA need classes: none here
  c.method_families = ("baselines", "global_meta", "cdc_mmpg", "cdc_robust")
  return c
