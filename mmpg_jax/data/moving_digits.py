"""Moving-digit videos with templated questions and captions, one distribution per device.

This is the generator behind the embedded benchmark. It is pure numpy and deterministic:
a device is a function of (data seed, split, device index) only, so the TFDS builder
(`tfds_moving_digits.py`) and the on-the-fly sampler of fresh meta-training devices run the
same code and agree bit for bit.

A device's distribution (DESIGN §4): appearance (stroke thickness, rotation, contrast
inversion, a static clutter background, blur, noise), a label prior, a motion prior and a
question mix. Each device has roles: `context` (unlabelled videos with the questions the user
asked, no answers), `support` (a few labelled samples, for FTA only), `query` (labelled,
evaluation) and `oracle` (plenty of labelled samples, for the oracle upper bound only).
"""
from typing import Mapping

import numpy as np
from scipy import ndimage

from mmpg_jax.data import digits

QUESTION_TYPES = ("digit", "direction")
DIRECTIONS = ("up", "down", "left", "right")
_DIR_STEP = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])   # (dy, dx) per frame
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWERS = tuple(str(d) for d in range(10)) + DIRECTIONS      # shared answer vocabulary
NUM_ANSWERS = len(ANSWERS)
ANSWER_GROUPS = ((0, 10), (10, 14))                          # answer ids of each question type
THICKNESS_WORDS = {-2: "faint", -1: "thin", 0: "plain", 1: "thick", 2: "bold", 3: "heavy"}

QUESTION_TEMPLATES = {
    "digit": ("what digit is shown", "which number appears in the video",
              "what number is moving", "which digit do you see"),
    "direction": ("which way does the digit move", "where is the number going",
                  "what direction is the motion", "which way is it moving"),
}
PAD, UNK = "<pad>", "<unk>"


def _build_vocab():
  words = {w for ts in QUESTION_TEMPLATES.values() for t in ts for w in t.split()}
  words |= set(DIGIT_WORDS) | set(DIRECTIONS) | set(THICKNESS_WORDS.values()) | {"a", "moving"}
  return (PAD, UNK) + tuple(sorted(words))


VOCAB = _build_vocab()
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}

SPLIT_CODES = {"global_train": 1, "meta": 2, "validation": 3, "test": 4, "test_ood": 5}
SPLIT_POOL = {"global_train": "global", "meta": "meta", "validation": "eval", "test": "eval",
              "test_ood": "eval"}
ROLE_CODES = {"train": 1, "context": 2, "support": 3, "query": 4, "oracle": 5}


def tokenize(text: str, length: int) -> np.ndarray:
  ids = [_WORD_ID.get(w, 1) for w in text.split()][:length]
  return np.array(ids + [0] * (length - len(ids)), np.int32)


def _dirichlet(rng, concentration, k):
  return rng.dirichlet(np.full(k, float(concentration)))


def sample_shift(rng: np.random.Generator, ranges: Mapping, size: int, pool_images: np.ndarray):
  """Draws one device's distribution from `ranges` (a data.shift or data.ood_shift config)."""
  rot = rng.uniform(*ranges["rotation"]) * rng.choice([-1.0, 1.0])
  thickness = int(rng.choice(np.asarray(ranges["thickness"])))
  background = np.zeros((size, size), np.float32)
  frag = digits.CROP // 2
  for _ in range(int(ranges["clutter_fragments"])):
    img = pool_images[rng.integers(len(pool_images))].astype(np.float32) / 255.0
    oy, ox = rng.integers(0, digits.CROP - frag + 1, size=2)
    py, px = rng.integers(0, size - frag + 1, size=2)
    background[py:py + frag, px:px + frag] = np.maximum(
        background[py:py + frag, px:px + frag], img[oy:oy + frag, ox:ox + frag])
  alpha = rng.uniform(*ranges["clutter_alpha"])
  preferred = rng.integers(len(DIRECTIONS))
  p = float(ranges["motion_preferred_prob"])
  motion_prior = np.full(len(DIRECTIONS), (1.0 - p) / (len(DIRECTIONS) - 1))
  motion_prior[preferred] = p
  return {
      "rotation": np.float32(rot),
      "thickness": np.int32(thickness),
      "invert": np.bool_(rng.random() < ranges["invert_prob"]),
      "background": (alpha * background).astype(np.float32),
      "noise": np.float32(rng.uniform(*ranges["noise"])),
      "blur": np.float32(rng.uniform(*ranges["blur"])),
      "label_prior": _dirichlet(rng, ranges["label_concentration"], 10).astype(np.float32),
      "motion_prior": motion_prior.astype(np.float32),
      "question_mix": _dirichlet(rng, ranges["question_concentration"],
                                 len(QUESTION_TYPES)).astype(np.float32),
  }


def _stroke(imgs: np.ndarray, thickness: int) -> np.ndarray:
  if thickness > 0:
    return ndimage.grey_dilation(imgs, size=(1, thickness + 1, thickness + 1))
  if thickness < 0:
    return ndimage.grey_erosion(imgs, size=(1, 1 - thickness, 1 - thickness))
  return imgs


def render(rng: np.random.Generator, shift: Mapping, pool_by_class, images: np.ndarray, n: int,
           cfg: Mapping) -> dict:
  """Renders n videos of one device. Returns every field; roles keep what they may show."""
  frames, size, speed = int(cfg["frames"]), int(cfg["size"]), int(cfg["speed"])
  crop = digits.CROP
  digit = rng.choice(10, size=n, p=shift["label_prior"] / shift["label_prior"].sum())
  direction = rng.choice(4, size=n, p=shift["motion_prior"] / shift["motion_prior"].sum())
  qtype = rng.choice(len(QUESTION_TYPES), size=n,
                     p=shift["question_mix"] / shift["question_mix"].sum())
  inst = np.array([rng.choice(pool_by_class[d]) for d in digit], np.int64)
  imgs = _stroke(images[inst].astype(np.float32) / 255.0, int(shift["thickness"]))
  angles = shift["rotation"] + rng.uniform(-cfg["rotation_jitter"], cfg["rotation_jitter"], n)
  imgs = np.stack([ndimage.rotate(im, a, reshape=False, order=1) for im, a in zip(imgs, angles)])
  imgs = np.clip(imgs, 0.0, 1.0)

  # Straight-line motion that stays inside the frame for all T frames.
  travel = speed * (frames - 1)
  room = size - crop
  if travel > room:
    raise ValueError(f"data.speed*(data.frames-1)={travel} does not fit in data.size-20={room}")
  step = _DIR_STEP[direction] * speed                                    # [n, 2]
  lo = np.where(step < 0, travel, 0)
  hi = np.where(step > 0, room - travel, room)
  start = rng.integers(lo, hi + 1)                                       # [n, 2]
  video = np.broadcast_to(shift["background"], (n, frames, size, size)).copy()
  ar = np.arange(crop)
  idx = np.arange(n)[:, None, None]
  for t in range(frames):
    y, x = (start + step * t).T
    rows, cols = (y[:, None] + ar)[:, :, None], (x[:, None] + ar)[:, None, :]
    video[idx, t, rows, cols] = np.maximum(video[idx, t, rows, cols], imgs)
  if shift["invert"]:
    video = 1.0 - video
  if shift["blur"] > 0:
    video = ndimage.gaussian_filter(video, sigma=(0, 0, float(shift["blur"]), float(shift["blur"])))
  video = video + rng.normal(0.0, float(shift["noise"]), video.shape)
  video = np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)

  qlen, clen = int(cfg["question_len"]), int(cfg["caption_len"])
  questions = np.zeros((n, len(QUESTION_TYPES), qlen), np.int32)
  for q, name in enumerate(QUESTION_TYPES):
    templates = QUESTION_TEMPLATES[name]
    which = rng.integers(len(templates), size=n)
    for i in range(n):
      questions[i, q] = tokenize(templates[which[i]], qlen)
  thick_word = THICKNESS_WORDS[int(shift["thickness"])]
  captions = np.stack([
      tokenize(f"a {thick_word} {DIGIT_WORDS[d]} moving {DIRECTIONS[m]}", clen)
      for d, m in zip(digit, direction)]) if n else np.zeros((0, clen), np.int32)
  answers = np.stack([digit, 10 + direction], axis=1).astype(np.int32)
  return {"video": video, "questions": questions, "answers": answers,
          "qtype": qtype.astype(np.int32), "caption": captions}


def _asked(full: dict, with_answer: bool, with_caption: bool) -> dict:
  """Keeps the question the user asked (and its answer where the role is labelled)."""
  rows = np.arange(len(full["qtype"]))
  out = {"video": full["video"], "question": full["questions"][rows, full["qtype"]],
         "qtype": full["qtype"]}
  if with_answer:
    out["answer"] = full["answers"][rows, full["qtype"]]
  if with_caption:
    out["caption"] = full["caption"]
  return out


def _rng(cfg, split, index, role=0):
  return np.random.default_rng([int(cfg["seed"]), SPLIT_CODES[split], int(index), role])


def _pool(cfg, split):
  images, _ = digits.load_mnist_5k()
  by_class = digits.instance_pools(int(cfg["seed"]))[SPLIT_POOL[split]]
  return images, by_class


def device_shift(cfg: Mapping, split: str, index: int) -> dict:
  images, by_class = _pool(cfg, split)
  ranges = cfg["ood_shift"] if split == "test_ood" else cfg["shift"]
  return sample_shift(_rng(cfg, split, index), ranges, int(cfg["size"]),
                      images[np.concatenate(by_class)])


def make_device(cfg: Mapping, split: str, index: int, roles: Mapping[str, int]) -> dict:
  """One simulated device: {'device_id', 'shift', role: {...}} for each requested role size.

  `context` carries videos and asked questions only (never answers); `support`, `query` and
  `oracle` carry answers. Each role draws from its own RNG stream, so changing one role's size
  leaves the others unchanged.
  """
  if split not in SPLIT_CODES or split == "global_train":
    raise ValueError(f"unknown device split {split!r}; expected one of "
                     f"{sorted(set(SPLIT_CODES) - {'global_train'})}")
  images, by_class = _pool(cfg, split)
  shift = device_shift(cfg, split, index)
  out = {"device_id": np.int32(index), "shift": shift}
  for role, n in roles.items():
    full = render(_rng(cfg, split, index, ROLE_CODES[role]), shift, by_class, images, int(n), cfg)
    out[role] = _asked(full, with_answer=(role != "context"), with_caption=(role != "context"))
  return out


def make_global_train_device(cfg: Mapping, index: int, n: int) -> dict:
  """Pooled cloud training data of one global-train device: every question type per video."""
  images, by_class = _pool(cfg, "global_train")
  ranges = cfg["shift"]
  shift = sample_shift(_rng(cfg, "global_train", index), ranges, int(cfg["size"]),
                       images[np.concatenate(by_class)])
  full = render(_rng(cfg, "global_train", index, ROLE_CODES["train"]), shift, by_class, images,
                n, cfg)
  return {"video": full["video"], "questions": full["questions"], "answers": full["answers"],
          "caption": full["caption"]}


def device_roles(cfg: Mapping, split: str) -> dict:
  """The role sizes that a split's devices carry."""
  roles = {"context": cfg["context_size"], "support": cfg["support_size"],
           "query": cfg["query_size"]}
  if split != "meta":
    roles["oracle"] = cfg["oracle_size"]
  return roles


def make_cloud_device(cfg: Mapping, split: str, index: int, roles: Mapping[str, int]) -> dict:
  """The cloud's fully labelled view of a simulated device (for meta-training only): every
  role keeps every question type and its answer. The same device as `make_device` (same
  shift, same videos); the device itself never sends labels."""
  images, by_class = _pool(cfg, split)
  shift = device_shift(cfg, split, index)
  out = {"device_id": np.int32(index)}
  for role, n in roles.items():
    full = render(_rng(cfg, split, index, ROLE_CODES[role]), shift, by_class, images, int(n), cfg)
    out[role] = {"video": full["video"], "questions": full["questions"],
                 "answers": full["answers"]}
  return out
