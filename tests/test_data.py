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
  assert set(pools) == set(digits.POOLS)
  sets = {p: set(np.concatenate(v)) for p, v in pools.items()}
  for a in sets:
    for b in sets:
      assert a == b or not (sets[a] & sets[b]), (a, b)
  assert sum(len(s) for s in sets.values()) == 5000
  _, y = digits.load_mnist_5k()
  for p, per_class in pools.items():
    for c, idx in enumerate(per_class):
      assert (y[idx] == c).all()
  # every split that renders devices has a pool of its own
  assert len(set(md.SPLIT_POOL.values())) == len(md.SPLIT_POOL)


def _poisoned_except(monkeypatch, pool):
  """Every digit image outside `pool` all white, those inside all black: a rendering that
  touches any other pool's digit (or cuts a clutter fragment from one) is no longer black."""
  images, y = digits.load_mnist_5k()
  poisoned = np.full_like(images, 255)
  poisoned[np.concatenate(digits.instance_pools(0)[pool])] = 0
  monkeypatch.setattr(digits, "load_mnist_5k", lambda: (poisoned, y))


def _clean(ranges):
  """Ranges whose rendering is black for black digits: no noise, no blur, no inversion, and
  full-strength clutter (so a fragment from another pool would show)."""
  return dict(ranges, noise=(0.0, 0.0), blur=(0.0, 0.0), invert_prob=0.0,
              clutter_alpha=(1.0, 1.0), clutter_fragments=4)


@pytest.mark.parametrize("split", ["validation", "test", "test_ood", "meta"])
def test_each_split_renders_only_its_own_digits(monkeypatch, smoke_config, split):
  """No digit image (clutter included) is shared between two evaluation roles, or between
  meta-training and evaluation: each split's videos are black when only its pool is."""
  _poisoned_except(monkeypatch, md.SPLIT_POOL[split])
  cfg = smoke_config.data.to_dict()
  cfg.update(shift=_clean(cfg["shift"]), ood_shift=_clean(cfg["ood_shift"]))
  dev = md.make_device(cfg, split, 3, {"context": 6, "query": 6})
  assert dev["context"]["video"].max() == 0 and dev["query"]["video"].max() == 0
  assert float(np.abs(dev["shift"]["background"]).max()) == 0.0


@pytest.mark.parametrize("split", ["validation", "test", "test_ood", "meta"])
def test_drifting_digits_splits_render_only_their_own_digits(monkeypatch, split):
  from mmpg_jax.core import config_loader
  from mmpg_jax.data import drifting_digits as dd
  from mmpg_jax.tasks.image_classification import pipeline_cfg
  cfg = pipeline_cfg(config_loader.load("digits_persona.py", "smoke").data)
  cfg = dict(cfg, shift=_clean(cfg["shift"]), ood_shift=_clean(cfg["ood_shift"]))
  _poisoned_except(monkeypatch, md.SPLIT_POOL[split])
  dev = dd.make_device(cfg, split, 2, {"context": 5, "query": 5})
  assert dev["context"]["image"].max() == 0 and dev["query"]["image"].max() == 0


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
  by_class = digits.instance_pools(0)["test"]
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
