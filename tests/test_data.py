import numpy as np
import pytest

from mmpg_jax.data import digits
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import pipeline
from mmpg_jax.tasks.base import stack


def _equal_trees(a, b):
  if isinstance(a, dict):
    assert set(a) == set(b)
    for k in a:
      _equal_trees(a[k], b[k])
  else:
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_digit_pools_are_disjoint_and_balanced():
  pools = digits.instance_pools(0)
  sets = {p: set(np.concatenate(v)) for p, v in pools.items()}
  assert not (sets["global"] & sets["meta"]) and not (sets["global"] & sets["eval"])
  assert not (sets["meta"] & sets["eval"])
  _, y = digits.load_mnist_5k()
  for p, per_class in pools.items():
    for c, idx in enumerate(per_class):
      assert (y[idx] == c).all()


def test_device_is_deterministic_and_roles_are_independent(smoke_config):
  cfg = smoke_config.data
  a = md.make_device(cfg, "test", 1, {"context": 4, "query": 5})
  b = md.make_device(cfg, "test", 1, {"context": 4, "query": 5})
  _equal_trees(a, b)
  c = md.make_device(cfg, "test", 1, {"context": 4, "query": 9})   # a bigger query set ...
  _equal_trees(a["context"], c["context"])                          # ... same context
  other = md.make_device(cfg, "test", 2, {"context": 4})
  assert not np.array_equal(a["context"]["video"], other["context"]["video"])


def test_context_carries_no_answers(smoke_config, task, model_and_params):
  dev = md.make_device(smoke_config.data, "validation", 0, md.device_roles(smoke_config.data,
                                                                           "validation"))
  # The context is unlabelled: no answers and no caption content. It does carry the captions
  # its users typed (the retrieval task's text queries), ...
  assert "answer" not in dev["context"] and "content" not in dev["context"]
  assert {"answer", "caption", "content"} <= set(dev["support"]) and "oracle" in dev
  # ... but a caption states its video's answers, so the QA task never reads context captions.
  model, params = model_and_params
  devices = stack([{k: v for k, v in dev.items() if k != "shift"}])
  enc = task.encode_split(model, params, devices, chunk=64)
  assert set(enc["context"]) == {"frames", "q", "qtype"}


def test_answers_match_the_rendered_motion(smoke_config):
  cfg = smoke_config.data
  rng = np.random.default_rng(0)
  images, _ = digits.load_mnist_5k()
  by_class = digits.instance_pools(0)["eval"]
  shift = md.sample_shift(rng, cfg.shift, cfg.size, images[:50])
  shift.update(noise=np.float32(0), invert=np.bool_(False), rotation=np.float32(0),
               background=np.zeros_like(shift["background"]))
  full = md.render(rng, shift, by_class, images, 40, cfg)
  v = full["video"].astype(float)
  ys, xs = np.arange(cfg.size)[:, None], np.arange(cfg.size)[None, :]
  mass = v.sum((2, 3)) + 1e-9
  cy, cx = (v * ys).sum((2, 3)) / mass, (v * xs).sum((2, 3)) / mass
  dy, dx = cy[:, -1] - cy[:, 0], cx[:, -1] - cx[:, 0]
  expect = np.select([dy < -3, dy > 3, dx < -3, dx > 3], [0, 1, 2, 3])
  assert np.array_equal(full["answers"][:, 1] - 10, expect)
  assert set(full["answers"][:, 0]) <= set(range(10))


def test_ood_shift_is_outside_the_training_ranges(smoke_config):
  cfg = smoke_config.data
  assert cfg.ood_shift.rotation[0] > cfg.shift.rotation[1]
  assert cfg.ood_shift.blur[0] > cfg.shift.blur[1]
  for i in range(3):
    s = md.device_shift(cfg, "test_ood", i)
    assert abs(s["rotation"]) >= cfg.ood_shift.rotation[0] and s["blur"] > 0


def test_builder_is_deterministic_and_equals_the_generator(smoke_config, bench, tmp_path):
  again = pipeline.prepare(smoke_config.data, str(tmp_path))
  for split in ("validation", "test", "test_ood"):
    _equal_trees(bench.devices(split), again.devices(split))
  a, b = bench.global_source(), again.global_source()
  assert len(a) == len(b) == smoke_config.data.num_global_devices * \
      smoke_config.data.global_videos_per_device
  for i in (0, len(a) - 1):
    _equal_trees(a[i], b[i])
  # The stored device equals what the on-the-fly generator makes for it.
  dev = md.make_device(smoke_config.data, "test", 1, md.device_roles(smoke_config.data, "test"))
  stored = bench.devices("test")
  for role in ("context", "query"):
    for k, v in dev[role].items():
      assert np.array_equal(stored[role][k][1], v)


def test_global_batches_are_a_function_of_the_step(bench):
  ds1, ds2 = bench.global_batches(8, seed=3), bench.global_batches(8, seed=3)
  _equal_trees(ds1[5], ds2[5])
  assert not np.array_equal(ds1[5]["video"], ds1[6]["video"])
  assert ds1[5]["video"].shape[0] == 8


def test_meta_devices_are_fresh_and_reproducible(smoke_config):
  s = pipeline.MetaDeviceSampler(smoke_config.data)
  b0, b0_again, b1 = s.batch(0, 2), s.batch(0, 2), s.batch(1, 2)
  _equal_trees(b0, b0_again)
  assert not np.array_equal(b0["context"]["video"], b1["context"]["video"])
  assert "oracle" not in b0


def test_unknown_split_is_a_clear_error(smoke_config, bench):
  with pytest.raises(ValueError, match="unknown device split"):
    md.make_device(smoke_config.data, "tset", 0, {"query": 1})
  with pytest.raises(ValueError, match="unknown device split"):
    bench.devices("train")
