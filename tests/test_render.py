"""The vectorised renderer equals the per-image one it replaced (tests/reference_render.py) byte
for byte, so GENERATOR_VERSION, and with it every prepared-data cache key, stays valid."""
import numpy as np
import pytest
import reference_render as ref
from scipy import ndimage

from mmpg_jax.data import digit_video, digits
from mmpg_jax.data import drifting_digits as dd
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import tfds_moving_digits as tmd

SPLITS = ("meta", "validation", "test", "test_ood", "val_ood")
# Training ranges that force each appearance: thin strokes inverted and blurred, thick plain.
VARIANTS = {"thin_inverted_blurred": dict(thickness=(-2, -1), invert_prob=1.0, blur=(0.5, 0.8)),
            "thick_plain": dict(thickness=(1, 2, 3), invert_prob=0.0, blur=(0.0, 0.0))}


@pytest.fixture(scope="module")
def video_cfg():
  import moving_digits_qa
  return tmd.data_config_dict(moving_digits_qa.get_config("smoke").data)


@pytest.fixture(scope="module")
def image_cfg():
  import digits_persona
  return tmd.data_config_dict(digits_persona.get_config("smoke").data)


def _forced(cfg, variant):
  return dict(cfg, shift=dict(cfg["shift"], **VARIANTS[variant]))


def _same(new, old, path=""):
  if isinstance(new, dict):
    assert set(new) == set(old), path
    for k in new:
      _same(new[k], old[k], f"{path}/{k}")
    return
  new, old = np.asarray(new), np.asarray(old)
  assert (new.dtype, new.shape) == (old.dtype, old.shape), path
  assert new.tobytes() == old.tobytes(), path


def _as_before(monkeypatch, make):
  """make() rendered by the package equals make() rendered by the reference code."""
  new = make()
  with monkeypatch.context() as m:
    ref.patch(m)
    old = make()
  _same(new, old)
  return new


def test_rotate_is_ndimage_rotate_bit_for_bit():
  images, _ = digits.load_mnist_5k()
  rng = np.random.default_rng(0)
  for trial in range(120):
    n = int(rng.integers(1, 24))
    imgs = images[rng.integers(0, len(images), n)].astype(np.float32) / 255.0
    if trial % 3 == 1:
      imgs = digit_video.stroke(imgs, int(rng.choice([-2, 1, 3])))
    if trial % 3 == 2:               # any values, signed zeros among them
      imgs = rng.uniform(-0.5, 1.5, imgs.shape).astype(np.float32)
      imgs[rng.random(imgs.shape) < 0.3] = -0.0
    if trial % 4 == 0:               # exact multiples of 45 degrees: taps land on the borders
      angles = rng.choice([0.0, 45.0, 90.0, -90.0, 180.0, 270.0, -360.0], n)
    else:
      angles = np.float32(rng.uniform(-400, 400)) + rng.uniform(-10, 10, n)
      angles = np.round(angles) if trial % 4 == 1 else angles
    want = np.stack([ndimage.rotate(im, a, reshape=False, order=1)
                     for im, a in zip(imgs, angles)])
    got = digit_video.rotate(imgs, angles)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), trial
  assert digit_video.rotate(np.zeros((0, 20, 20), np.float32), np.zeros(0)).shape == (0, 20, 20)


def test_instances_are_the_draws_of_rng_choice():
  for seed in range(40):
    rng = np.random.default_rng(seed)
    pools = [np.arange(s) + 1000 * c for c, s in enumerate(rng.choice([1, 3, 25, 300], 10))]
    digit = rng.integers(0, 10, int(rng.integers(0, 50)))
    a, b = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
    want = np.array([a.choice(pools[d]) for d in digit], np.int64)
    got = digit_video.instances(b, pools, digit)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert a.random() == b.random()            # the stream left where the loop left it


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("split", SPLITS)
def test_moving_digit_devices_render_as_before(monkeypatch, video_cfg, split, variant):
  cfg = _forced(video_cfg, variant)
  roles = {"context": 4, "query": 3}
  dev = _as_before(monkeypatch, lambda: md.make_device(cfg, split, 1, roles))
  _as_before(monkeypatch, lambda: md.make_cloud_device(cfg, split, 2, roles))
  if split not in md.SPLIT_RANGES:     # the held-out groups keep their own ranges
    s = dev["shift"]
    assert bool(s["invert"]) == (variant == "thin_inverted_blurred")
    assert (float(s["blur"]) > 0) == (variant == "thin_inverted_blurred")
    assert (int(s["thickness"]) < 0) == (variant == "thin_inverted_blurred")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_moving_digit_cloud_training_and_noisy_captions_render_as_before(monkeypatch, video_cfg,
                                                                         variant):
  cfg = _forced(video_cfg, variant)
  for index in range(2):
    _as_before(monkeypatch, lambda: md.make_global_train_device(cfg, index, 5))
  # wide_text meta devices: UNK words and shuffled phrasings
  noisy = dict(cfg, caption_noise={"unk": (0.3, 0.7), "shuffle": (0.5, 1.0)})
  dev = _as_before(monkeypatch, lambda: md.make_cloud_device(noisy, "meta", 0, {"context": 8}))
  assert (dev["context"]["caption"] == md._CAPTION_ID[md.UNK]).any()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_drifting_digit_streams_render_as_before(monkeypatch, image_cfg, variant):
  cfg = _forced(image_cfg, variant)
  roles = {"context": 5, "query": 4, "oracle": 0}
  for split in SPLITS:
    _as_before(monkeypatch, lambda: dd.make_device(cfg, split, 1, roles))
  _as_before(monkeypatch, lambda: dd.make_global_train_device(cfg, 0, 6))
  # consecutive meta windows: one remembered stream, then the next
  w = int(cfg["drift"]["windows"])
  for index in range(w - 1, 2 * w + 1):
    _as_before(monkeypatch, lambda: dd.meta_window(cfg, index, {"context": 3, "query": 3}))


def test_a_remembered_stream_is_the_stream_drawn_afresh(image_cfg):
  fresh = ref.trajectory(image_cfg, "test", 2)
  for index in (2, 2, 1, 2):
    got = dd.trajectory(image_cfg, "test", index)
    if index == 2:
      _same({str(i): s for i, s in enumerate(got)}, {str(i): s for i, s in enumerate(fresh)})
  with pytest.raises(ValueError):      # shared between callers: read-only
    got[0]["clutter"][0, 0] = 1.0
  other = dict(image_cfg, seed=1)      # another config is another stream
  assert not np.array_equal(dd.trajectory(other, "test", 2)[0]["clutter"], got[0]["clutter"])
