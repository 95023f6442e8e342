"""Device models (Flax linen). `build(model_cfg, **dims)` returns the configured device model;
the task passes the dimensions its data fixes (answers, vocabulary size)."""
from mmpg_jax.models import digit_cnn, seqrec, video_lmm

_MODELS = {"video_lmm": video_lmm.VideoLMM, "video_retrieval": video_lmm.VideoRetrieval,
           "digit_cnn": digit_cnn.DigitClassifier, "seqrec": seqrec.SeqRec}


def build(model_cfg, **dims):
  if model_cfg.name not in _MODELS:
    raise ValueError(f"unknown model.name {model_cfg.name!r}; known: {sorted(_MODELS)}")
  return _MODELS[model_cfg.name](**dims, **{k: v for k, v in model_cfg.items() if k != "name"})
