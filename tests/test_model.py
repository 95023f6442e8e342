import numpy as np

from mmpg_jax.core import params as P
from mmpg_jax.ondevice import device


def _inputs(cfg, n=3, seed=0):
  rng = np.random.default_rng(seed)
  d = cfg.data
  video = rng.integers(0, 255, (n, d.frames, d.size, d.size), dtype=np.uint8)
  question = rng.integers(1, 20, (n, d.question_len)).astype(np.int32)
  return video, question


def test_zero_edit_reproduces_the_model_outputs_exactly(smoke_config, model_and_params):
  model, params = model_and_params
  video, question = _inputs(smoke_config)
  _, dyn = P.split(params, smoke_config.dynamic_leaves)
  base = model.apply({"params": params}, video, question)
  edited = model.apply({"params": P.apply_edit(params, P.zeros_edit(dyn))}, video, question)
  assert np.array_equal(np.asarray(base), np.asarray(edited))


def test_cached_feature_path_equals_the_full_model(smoke_config, task, model_and_params):
  model, params = model_and_params
  video, question = _inputs(smoke_config)
  full = model.apply({"params": params}, video, question)
  cached = task.scores(model, params, task.encode(model, params, video, question))
  np.testing.assert_allclose(full, cached, rtol=1e-6, atol=1e-6)


def test_temporal_pooling_is_order_aware(smoke_config, model_and_params):
  # Mean/max pooling alone cannot tell a digit moving up from one moving down.
  model, params = model_and_params
  video, question = _inputs(smoke_config)
  fwd = model.apply({"params": params}, video, question)
  rev = model.apply({"params": params}, video[:, ::-1], question)
  assert not np.allclose(fwd, rev, atol=1e-5)


def test_default_dynamic_leaves_exclude_the_encoders(smoke_config, task, model_and_params):
  _, params = model_and_params
  dyn = P.select(params, smoke_config.dynamic_leaves)
  assert dyn and not any(p.startswith(("frame_encoder", "question_encoder")) for p in dyn)
  device.cached_features_valid(params, smoke_config.dynamic_leaves, task.encoder_prefixes)
