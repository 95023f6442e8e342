"""The pixel side of a moving-digit video (`moving_digits`): a device's static clutter
background, each video's digit glyph, its straight-line motion, the painted frames and the
device's degradations. Pure numpy; each function makes its RNG draws in the generator's order,
so the rendered bytes stay those of GENERATOR_VERSION."""
from typing import Mapping

import numpy as np
from scipy import ndimage

from mmpg_jax.data import digits

DIR_STEP = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])   # (dy, dx) per frame of each direction


def clutter(rng: np.random.Generator, fragments: int, size: int,
            pool_images: np.ndarray) -> np.ndarray:
  """A static background [size, size] in [0, 1]: `fragments` random half-crops of pool
  digits, each pasted (max) at a random place."""
  background = np.zeros((size, size), np.float32)
  frag = digits.CROP // 2
  for _ in range(fragments):
    img = pool_images[rng.integers(len(pool_images))].astype(np.float32) / 255.0
    oy, ox = rng.integers(0, digits.CROP - frag + 1, size=2)
    py, px = rng.integers(0, size - frag + 1, size=2)
    background[py:py + frag, px:px + frag] = np.maximum(
        background[py:py + frag, px:px + frag], img[oy:oy + frag, ox:ox + frag])
  return background


def stroke(imgs: np.ndarray, thickness: int) -> np.ndarray:
  """Digit images [n, H, W] with their strokes thickened (> 0) or thinned (< 0)."""
  if thickness > 0:
    return ndimage.grey_dilation(imgs, size=(1, thickness + 1, thickness + 1))
  if thickness < 0:
    return ndimage.grey_erosion(imgs, size=(1, 1 - thickness, 1 - thickness))
  return imgs


def glyphs(rng: np.random.Generator, shift: Mapping, pool_by_class, images: np.ndarray,
           digit: np.ndarray, jitter: float) -> np.ndarray:
  """Each video's digit [n, CROP, CROP] in [0, 1]: a pool instance of its class, stroked to
  the device's thickness and rotated by the device's angle plus a per-video jitter."""
  inst = np.array([rng.choice(pool_by_class[d]) for d in digit], np.int64)
  imgs = stroke(images[inst].astype(np.float32) / 255.0, int(shift["thickness"]))
  angles = shift["rotation"] + rng.uniform(-jitter, jitter, len(digit))
  imgs = np.stack([ndimage.rotate(im, a, reshape=False, order=1) for im, a in zip(imgs, angles)])
  return np.clip(imgs, 0.0, 1.0)


def motion(rng: np.random.Generator, direction: np.ndarray, frames: int, size: int,
           speed: int) -> tuple:
  """Each video's start corner and per-frame step ([n, 2] each, (y, x)): a straight line that
  stays inside the frame for all `frames` frames."""
  travel = speed * (frames - 1)
  room = size - digits.CROP
  if travel > room:
    raise ValueError(f"data.speed*(data.frames-1)={travel} does not fit in data.size-20={room}")
  step = DIR_STEP[direction] * speed                                     # [n, 2]
  lo = np.where(step < 0, travel, 0)
  hi = np.where(step > 0, room - travel, room)
  return rng.integers(lo, hi + 1), step                                  # [n, 2] each


def paint(background: np.ndarray, imgs: np.ndarray, start: np.ndarray, step: np.ndarray,
          frames: int, size: int) -> np.ndarray:
  """The clean videos [n, frames, size, size]: each glyph pasted (max) over the background at
  its position in every frame."""
  n, ar = len(imgs), np.arange(digits.CROP)
  video = np.broadcast_to(background, (n, frames, size, size)).copy()
  idx = np.arange(n)[:, None, None]
  for t in range(frames):
    y, x = (start + step * t).T
    rows, cols = (y[:, None] + ar)[:, :, None], (x[:, None] + ar)[:, None, :]
    video[idx, t, rows, cols] = np.maximum(video[idx, t, rows, cols], imgs)
  return video


def degrade(rng: np.random.Generator, video: np.ndarray, shift: Mapping) -> np.ndarray:
  """The device's appearance on clean videos: contrast inversion, blur, then sensor noise;
  quantised to uint8."""
  if shift["invert"]:
    video = 1.0 - video
  if shift["blur"] > 0:
    video = ndimage.gaussian_filter(video, sigma=(0, 0, float(shift["blur"]), float(shift["blur"])))
  video = video + rng.normal(0.0, float(shift["noise"]), video.shape)
  return np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)


def render_videos(rng: np.random.Generator, shift: Mapping, pool_by_class, images: np.ndarray,
                  digit: np.ndarray, direction: np.ndarray, cfg: Mapping) -> np.ndarray:
  """One device's videos [n, T, S, S] uint8: digit i moving in direction i over the device's
  background, with the device's appearance shift."""
  frames, size, speed = int(cfg["frames"]), int(cfg["size"]), int(cfg["speed"])
  imgs = glyphs(rng, shift, pool_by_class, images, digit, cfg["rotation_jitter"])
  start, step = motion(rng, direction, frames, size, speed)
  return degrade(rng, paint(shift["background"], imgs, start, step, frames, size), shift)
