"""Device models (Flax linen). `build(config)` returns the configured device model."""
from mmpg_jax.models import video_lmm


def build(model_cfg, num_answers: int, vocab_size: int):
  if model_cfg.name == "video_lmm":
    return video_lmm.VideoLMM(num_answers=num_answers, vocab_size=vocab_size,
                              **{k: v for k, v in model_cfg.items() if k != "name"})
  raise ValueError(f"unknown model.name {model_cfg.name!r}; known: 'video_lmm'")
