"""The per-image renderer as it was before vectorisation (GENERATOR_VERSION 5 / 2), kept as the
reference the vectorised one must equal byte for byte (tests/test_render.py). A faithful copy:
one ndimage.rotate per digit, a paint loop over frames, per-caption tokenisation, a drifting
stream's shifts drawn afresh for each window. `patch` swaps these in for the package's, so the
whole device path renders the old way."""
import numpy as np
from scipy import ndimage

from mmpg_jax.data import digit_video, digits
from mmpg_jax.data import drifting_digits as dd
from mmpg_jax.data import moving_digits as md


def glyphs(rng, shift, pool_by_class, images, digit, jitter):
  inst = np.array([rng.choice(pool_by_class[d]) for d in digit], np.int64)
  imgs = digit_video.stroke(images[inst].astype(np.float32) / 255.0, int(shift["thickness"]))
  angles = shift["rotation"] + rng.uniform(-jitter, jitter, len(digit))
  imgs = np.stack([ndimage.rotate(im, a, reshape=False, order=1) for im, a in zip(imgs, angles)])
  return np.clip(imgs, 0.0, 1.0)


def paint(background, imgs, start, step, frames, size):
  n, ar = len(imgs), np.arange(digits.CROP)
  video = np.broadcast_to(background, (n, frames, size, size)).copy()
  idx = np.arange(n)[:, None, None]
  for t in range(frames):
    y, x = (start + step * t).T
    rows, cols = (y[:, None] + ar)[:, :, None], (x[:, None] + ar)[:, None, :]
    video[idx, t, rows, cols] = np.maximum(video[idx, t, rows, cols], imgs)
  return video


def degrade(rng, video, shift):
  if shift["invert"]:
    video = 1.0 - video
  if shift["blur"] > 0:
    video = ndimage.gaussian_filter(video, sigma=(0, 0, float(shift["blur"]), float(shift["blur"])))
  video = video + rng.normal(0.0, float(shift["noise"]), video.shape)
  return np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)


def render_videos(rng, shift, pool_by_class, images, digit, direction, cfg):
  frames, size, speed = int(cfg["frames"]), int(cfg["size"]), int(cfg["speed"])
  imgs = glyphs(rng, shift, pool_by_class, images, digit, cfg["rotation_jitter"])
  start, step = digit_video.motion(rng, direction, frames, size, speed)
  return degrade(rng, paint(shift["background"], imgs, start, step, frames, size), shift)


def draw_questions(rng, n, qlen):
  questions = np.zeros((n, len(md.QUESTION_TYPES), qlen), np.int32)
  for q, name in enumerate(md.QUESTION_TYPES):
    templates = md.QUESTION_TEMPLATES[name]
    which = rng.integers(len(templates), size=n)
    for i in range(n):
      questions[i, q] = md.tokenize(templates[which[i]], qlen)
  return questions


def draw_captions(caption_rng, shift, digit, direction, phrasings, clen):
  n = len(digit)
  thick_word = md.THICKNESS_WORDS[int(shift["thickness"])]
  def draw(key, k):
    mix = np.asarray(shift.get(key, np.eye(k)[0]), np.float64)[:k]
    return caption_rng.choice(k, size=n, p=mix / mix.sum())

  which = draw("caption_mix", len(phrasings))
  dform, mform = draw("digit_forms", len(md.DIGIT_FORMS)), draw("direction_forms",
                                                                len(md.DIRECTION_FORMS))
  templates = [phrasings[w] for w in which]
  if "caption_unk" in shift:
    templates = [md.perturb_phrasing(caption_rng, t, float(shift["caption_unk"]),
                                     float(shift["caption_shuffle"])) for t in templates]
  return np.stack([
      md.tokenize(t.format(t=thick_word, d=md.DIGIT_FORMS[fd][d], m=md.DIRECTION_FORMS[fm][m]),
                  clen, md._CAPTION_ID)
      for t, d, m, fd, fm in zip(templates, digit, direction, dform, mform)
  ]) if n else np.zeros((0, clen), np.int32)


def render_images(rng, shift, pool_by_class, images, n, cfg):
  size, crop = int(cfg["size"]), digits.CROP
  label = rng.choice(dd.NUM_CLASSES, size=n, p=shift["label_prior"] / shift["label_prior"].sum())
  inst = np.array([rng.choice(pool_by_class[d]) for d in label], np.int64)
  imgs = digit_video.stroke(images[inst].astype(np.float32) / 255.0, int(shift["thickness"]))
  angles = shift["rotation"] + rng.uniform(-cfg["rotation_jitter"], cfg["rotation_jitter"], n)
  imgs = np.stack([ndimage.rotate(im, a, reshape=False, order=1) for im, a in zip(imgs, angles)]
                  ) if n else np.zeros((0, crop, crop), np.float32)
  imgs = np.clip(imgs, 0.0, 1.0)
  centre = (size - crop) // 2
  j = int(cfg["jitter"])
  off = centre + rng.integers(-j, j + 1, size=(n, 2))
  background = shift["clutter_strength"] * shift["clutter"]
  canvas = np.broadcast_to(background, (n, size, size)).astype(np.float32)
  ar = np.arange(crop)
  rows = (off[:, 0:1] + ar)[:, :, None]
  cols = (off[:, 1:2] + ar)[:, None, :]
  idx = np.arange(n)[:, None, None]
  canvas[idx, rows, cols] = np.maximum(canvas[idx, rows, cols], imgs)
  if shift["invert"]:
    canvas = 1.0 - canvas
  if shift["blur"] > 0:
    canvas = ndimage.gaussian_filter(canvas, sigma=(0, float(shift["blur"]),
                                                    float(shift["blur"])))
  canvas = canvas + rng.normal(0.0, float(shift["noise"]), canvas.shape)
  return {"image": np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8),
          "label": label.astype(np.int32)}


def trajectory(cfg, split, index):
  images, by_class = dd._pool(cfg, split)
  ranges = md.split_ranges(cfg, split)
  pool_images = images[np.concatenate(by_class)]
  size = int(cfg["size"])
  rng = np.random.default_rng([int(cfg["seed"]), dd.SPLIT_CODES[split], int(index),
                               dd.DRIFT_CODE])
  out = [dict(dd.new_shift(rng, ranges, size, pool_images), jumped=np.bool_(False))]
  for _ in range(int(cfg["drift"]["windows"]) - 1):
    nxt, jumped = dd.drift_step(rng, out[-1], ranges, cfg["drift"], size, pool_images)
    out.append(dict(nxt, jumped=np.bool_(jumped)))
  return out


def patch(monkeypatch):
  """Makes the package render with this module's per-image code (for one test)."""
  monkeypatch.setattr(digit_video, "render_videos", render_videos)
  monkeypatch.setattr(md, "_draw_questions", draw_questions)
  monkeypatch.setattr(md, "_draw_captions", draw_captions)
  monkeypatch.setattr(dd, "render_images", render_images)
  monkeypatch.setattr(dd, "trajectory", trajectory)
