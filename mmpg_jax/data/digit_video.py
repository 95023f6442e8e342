"""The pixel side of a moving-digit video (`moving_digits`): a device's static clutter
background, each video's digit glyph, its straight-line motion, the painted frames and the
device's degradations. Pure numpy, batched over a device's videos; each function makes its RNG
draws in the generator's order, so the rendered bytes stay those of GENERATOR_VERSION (the
per-image code they replaced is tests/reference_render.py, held equal by tests/test_render.py)."""
from typing import Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage, special

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


def instances(rng: np.random.Generator, pool_by_class, digit: np.ndarray) -> np.ndarray:
  """Each digit's pool instance [n] int64: one bounded draw per digit over its class's pool,
  the very draws (and stream position) of rng.choice(pool_by_class[d]) made one at a time."""
  sizes = np.array([len(p) for p in pool_by_class])
  first = np.cumsum(sizes) - sizes
  pick = rng.integers(0, sizes[digit])
  return np.concatenate(pool_by_class).astype(np.int64)[first[digit] + pick]


def _taps(cc: np.ndarray, size: int) -> tuple:
  """ndimage's linear-spline taps along one axis in mode 'constant': whether each coordinate
  lies inside [0, size - 1], its two indices (the second mirrored back in, with weight 0, at
  the last index) and their weights, 1 - frac and 1 - (1 - frac) as ndimage forms them."""
  inside = (cc >= 0) & (cc <= size - 1)
  lo = np.floor(cc)
  w0 = 1.0 - (cc - lo)
  i0 = np.where(inside, lo, 0).astype(np.intp)
  i1 = i0 + 1
  i1[i1 >= size] = size - 2
  return inside, i0, i1, w0, 1.0 - w0


def rotate(imgs: np.ndarray, angles: np.ndarray) -> np.ndarray:
  """ndimage.rotate(im, a, reshape=False, order=1) of each image [n, H, W] float32, all at
  once and bit for bit: rotate's matrix and offset, each output pixel's input coordinate as
  its C loop sums it (offset + i m0 + j m1), the four taps multiplied and summed in its order
  in float64, zero outside the image, then cast to float32."""
  n, h, w = imgs.shape
  angles = np.asarray(angles, np.float64)
  c, s = special.cosdg(angles), special.sindg(angles)
  rot = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)        # [n, 2, 2]
  centre = (np.asarray((h, w)) - 1) / 2
  offset = centre - rot @ centre                                             # [n, 2]
  i = np.arange(h, dtype=np.float64)[:, None]
  j = np.arange(w, dtype=np.float64)[None, :]
  c, s, offset = c[:, None, None], s[:, None, None], offset[:, :, None, None]
  in_y, y0, y1, wy0, wy1 = _taps(offset[:, 0] + i * c + j * s, h)
  in_x, x0, x1, wx0, wx1 = _taps(offset[:, 1] + i * -s + j * c, w)
  flat = imgs.reshape(-1).astype(np.float64)
  r0 = np.arange(n)[:, None, None] * (h * w) + y0 * w
  r1 = r0 + (y1 - y0) * w
  t = 0.0 + flat[r0 + x0] * wy0 * wx0
  t += flat[r0 + x1] * wy0 * wx1
  t += flat[r1 + x0] * wy1 * wx0
  t += flat[r1 + x1] * wy1 * wx1
  t[~(in_y & in_x)] = 0.0
  return t.astype(np.float32)


def glyphs(rng: np.random.Generator, shift: Mapping, pool_by_class, images: np.ndarray,
           digit: np.ndarray, jitter: float) -> np.ndarray:
  """Each video's digit [n, CROP, CROP] in [0, 1]: a pool instance of its class, stroked to
  the device's thickness and rotated by the device's angle plus a per-video jitter."""
  inst = instances(rng, pool_by_class, digit)
  imgs = stroke(images[inst].astype(np.float32) / 255.0, int(shift["thickness"]))
  angles = shift["rotation"] + rng.uniform(-jitter, jitter, len(digit))
  return np.clip(rotate(imgs, angles), 0.0, 1.0)


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


def paste(canvas: np.ndarray, imgs: np.ndarray, corner: np.ndarray) -> np.ndarray:
  """Each glyph pasted (max) into its canvas at its corner, in place: canvas [..., S, S],
  corner [..., 2] (y, x), imgs [..., C, C] broadcast to corner's leading shape. One gather
  and one scatter of CxC windows (a strided view), not of single pixels."""
  crop = imgs.shape[-1]
  win = sliding_window_view(canvas, (crop, crop), axis=(-2, -1), writeable=True)
  at = (*np.indices(corner.shape[:-1], sparse=True), corner[..., 0], corner[..., 1])
  win[at] = np.maximum(win[at], imgs)
  return canvas


def paint(background: np.ndarray, imgs: np.ndarray, start: np.ndarray, step: np.ndarray,
          frames: int, size: int) -> np.ndarray:
  """The clean videos [n, frames, size, size]: each glyph pasted (max) over the background at
  its position in every frame (all frames at once: a video's frames never overlap)."""
  video = np.broadcast_to(background, (len(imgs), frames, size, size)).copy()
  corner = start[:, None] + step[:, None] * np.arange(frames)[:, None]   # [n, frames, 2]
  return paste(video, imgs[:, None], corner)


def quantise(clean: np.ndarray, noise: np.ndarray) -> np.ndarray:
  """uint8 of clip(rint(255 (clean + noise))), worked in `noise`'s float64 buffer: the same
  float64 arithmetic as the expression, without its temporaries."""
  np.add(clean, noise, out=noise)
  np.multiply(noise, 255.0, out=noise)
  np.rint(noise, out=noise)
  np.clip(noise, 0, 255, out=noise)
  return noise.astype(np.uint8)


def degrade(rng: np.random.Generator, clean: np.ndarray, shift: Mapping) -> np.ndarray:
  """The device's appearance on clean images [..., S, S] float32 (overwritten): contrast
  inversion, blur over the last two axes, then sensor noise; quantised to uint8."""
  if shift["invert"]:
    clean = np.subtract(1.0, clean, out=clean)
  if shift["blur"] > 0:
    blur = float(shift["blur"])
    clean = ndimage.gaussian_filter(clean, sigma=(0,) * (clean.ndim - 2) + (blur, blur))
  return quantise(clean, rng.normal(0.0, float(shift["noise"]), clean.shape))


def render_videos(rng: np.random.Generator, shift: Mapping, pool_by_class, images: np.ndarray,
                  digit: np.ndarray, direction: np.ndarray, cfg: Mapping) -> np.ndarray:
  """One device's videos [n, T, S, S] uint8: digit i moving in direction i over the device's
  background, with the device's appearance shift."""
  frames, size, speed = int(cfg["frames"]), int(cfg["size"]), int(cfg["speed"])
  imgs = glyphs(rng, shift, pool_by_class, images, digit, cfg["rotation_jitter"])
  start, step = motion(rng, direction, frames, size, speed)
  return degrade(rng, paint(shift["background"], imgs, start, step, frames, size), shift)
