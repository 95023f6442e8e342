"""Moving-digit videos with templated questions and captions, one distribution per device.

This is the generator behind the embedded benchmark. It is pure numpy and deterministic:
a device is a function of (data seed, split, device index) only, so the TFDS builder
(`tfds_moving_digits.py`) and the on-the-fly sampler of fresh meta-training devices run the
same code and agree bit for bit.

A device's distribution: appearance (stroke thickness, rotation, contrast
inversion, a static clutter background, blur, noise), a label prior, a motion prior and a
question mix. Each device has roles: `context` (unlabelled videos with the questions the user
asked, no answers), `support` (a few labelled samples, for FTA only), `query` (labelled,
evaluation) and `oracle` (plenty of labelled samples, for the oracle upper bound only).
"""
import functools
from typing import Mapping

import numpy as np

from mmpg_jax.data import digit_video, digits
from mmpg_jax.data.digit_shifts import (  # noqa: F401  (the generator's public names)
    CONCENTRATIONS, CONTINUOUS_SHIFTS, PROBABILITY_SHIFTS, THICKNESS_WORDS, intervals, uniform,
    widen)

# Bump when the generator's output changes: it is part of the prepared data's cache key.
GENERATOR_VERSION = 5            # 5: each evaluation split has its own digit pool
QUESTION_TYPES = ("digit", "direction")
DIRECTIONS = ("up", "down", "left", "right")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWERS = tuple(str(d) for d in range(10)) + DIRECTIONS      # shared answer vocabulary
NUM_ANSWERS = len(ANSWERS)
ANSWER_GROUPS = ((0, 10), (10, 14))                          # answer ids of each question type

QUESTION_TEMPLATES = {
    "digit": ("what digit is shown", "which number appears in the video",
              "what number is moving", "which digit do you see"),
    "direction": ("which way does the digit move", "where is the number going",
                  "what direction is the motion", "which way is it moving"),
}
PAD, UNK = "<pad>", "<unk>"

# Captions (what a user types to find a video) in several phrasings. The cloud's own captions
# follow data.cloud_caption_mix (mostly the first two); each device has its own mix over all
# of them (text-side shift). The two held-out groups each use phrasings of their own that no
# training data ever shows: the test OOD group's and, disjoint from them, the validation OOD
# group's (where robustness choices are made). {t} thickness word, {d} digit word, {m}
# direction.
CAPTION_TEMPLATES = (
    "a {t} {d} moving {m}", "{d} going {m}", "the number {d} slides {m}", "{m} moving {d}",
    "a {t} digit {d} heads {m}", "video of {d} drifting {m}")
OOD_CAPTION_TEMPLATES = ("{m} goes the {t} {d}", "watch {d} travel {m}", "{d} {m} clip")
VAL_OOD_CAPTION_TEMPLATES = ("see {d} pass {m}", "{t} {d} sliding {m} here", "{d} is off {m}")
MAX_CAPTION_TEMPLATES = max(len(CAPTION_TEMPLATES), len(OOD_CAPTION_TEMPLATES),
                            len(VAL_OOD_CAPTION_TEMPLATES))
# How a caption words its content: digits as words or numerals, directions plain, "-ward" or
# by compass. The cloud almost always uses the first form (data.cloud_*_forms); each device
# has its own mix (vocabulary shift on the text side).
DIGIT_FORMS = (DIGIT_WORDS, tuple(str(d) for d in range(10)))
DIRECTION_FORMS = (DIRECTIONS, ("upward", "downward", "leftward", "rightward"),
                   ("north", "south", "west", "east"))


def _build_vocab():
  words = {w for ts in QUESTION_TEMPLATES.values() for t in ts for w in t.split()}
  words |= set(DIGIT_WORDS) | set(DIRECTIONS) | set(THICKNESS_WORDS.values()) | {"a", "moving"}
  return (PAD, UNK) + tuple(sorted(words))


VOCAB = _build_vocab()
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def _build_caption_vocab():
  """Every caption word, OOD phrasings included (their embeddings are never trained)."""
  words = set(THICKNESS_WORDS.values())
  words |= {w for forms in DIGIT_FORMS + DIRECTION_FORMS for w in forms}
  for t in CAPTION_TEMPLATES + OOD_CAPTION_TEMPLATES + VAL_OOD_CAPTION_TEMPLATES:
    words |= {w for w in t.split() if not w.startswith("{")}
  return (PAD, UNK) + tuple(sorted(words))


CAPTION_VOCAB = _build_caption_vocab()
_CAPTION_ID = {w: i for i, w in enumerate(CAPTION_VOCAB)}

SPLIT_CODES = {"global_train": 1, "meta": 2, "validation": 3, "test": 4, "test_ood": 5,
               "val_ood": 9}
# Each split draws digits (and clutter fragments) from its own disjoint pool (digits.POOLS).
SPLIT_POOL = {"global_train": "global", "meta": "meta", "validation": "validation",
              "test": "test", "test_ood": "test_ood", "val_ood": "val_ood"}
# The shift ranges each split's devices draw from (data config keys).
SPLIT_RANGES = {"test_ood": "ood_shift", "val_ood": "val_ood_shift"}
ROLE_CODES = {"train": 1, "context": 2, "support": 3, "query": 4, "oracle": 5}
CAPTION_STYLE_CODE = 6          # RNG stream of a device's caption mix
META_MIX_CODE = 7               # RNG stream of a meta device's draw: training or wide shifts
CAPTION_ROLE_OFFSET = 100       # + ROLE_CODES[role]: RNG stream of a role's caption phrasings
CAPTION_NOISE_CODE = 8          # RNG stream of a meta device's caption noise (cdc_robust wide_text)


def tokenize(text: str, length: int, vocab=None) -> np.ndarray:
  vocab = _WORD_ID if vocab is None else vocab
  ids = [vocab.get(w, 1) for w in text.split()][:length]
  return np.array(ids + [0] * (length - len(ids)), np.int32)


def caption_templates(split: str) -> tuple:
  """The phrasings a split's captions use: each held-out group its own."""
  return {"test_ood": OOD_CAPTION_TEMPLATES,
          "val_ood": VAL_OOD_CAPTION_TEMPLATES}.get(split, CAPTION_TEMPLATES)


def split_ranges(cfg, split: str):
  """The shift ranges of a split's devices: the held-out groups' own, else training's."""
  return cfg[SPLIT_RANGES[split]] if split in SPLIT_RANGES else cfg["shift"]


def caption_style(cfg, split: str, index: int) -> dict:
  """A device's caption style: its mix over phrasings (padded to MAX_CAPTION_TEMPLATES for a
  fixed TFDS feature) and over the word forms of digits and directions. Its own RNG stream:
  the video and question streams are unchanged by it. The cloud's training devices share
  data.cloud_caption_mix / cloud_digit_forms / cloud_direction_forms."""
  if split == "global_train":
    mix = np.asarray(cfg["cloud_caption_mix"], np.float64)
    digit = np.asarray(cfg["cloud_digit_forms"], np.float64)
    direction = np.asarray(cfg["cloud_direction_forms"], np.float64)
  else:
    rng = _rng(cfg, split, index, CAPTION_STYLE_CODE)
    conc = cfg["caption_concentration"]
    mix = _dirichlet(rng, conc, len(caption_templates(split)))
    digit = _dirichlet(rng, conc, len(DIGIT_FORMS))
    direction = _dirichlet(rng, conc, len(DIRECTION_FORMS))
  out = np.zeros(MAX_CAPTION_TEMPLATES, np.float32)
  out[:len(mix)] = mix
  return {"caption_mix": out, "digit_forms": digit.astype(np.float32),
          "direction_forms": direction.astype(np.float32)}


def _dirichlet(rng, concentration, k):
  return rng.dirichlet(np.full(k, float(concentration)))


def sample_shift(rng: np.random.Generator, ranges: Mapping, size: int, pool_images: np.ndarray):
  """Draws one device's distribution from `ranges` (a data.shift or data.ood_shift config;
  the continuous ones, CONTINUOUS_SHIFTS, may be unions of intervals)."""
  rot = uniform(rng, ranges["rotation"]) * rng.choice([-1.0, 1.0])
  thickness = int(rng.choice(np.asarray(ranges["thickness"])))
  background = digit_video.clutter(rng, int(ranges["clutter_fragments"]), size, pool_images)
  alpha = uniform(rng, ranges["clutter_alpha"])
  preferred = rng.integers(len(DIRECTIONS))
  p = float(ranges["motion_preferred_prob"])
  motion_prior = np.full(len(DIRECTIONS), (1.0 - p) / (len(DIRECTIONS) - 1))
  motion_prior[preferred] = p
  return {
      "rotation": np.float32(rot),
      "thickness": np.int32(thickness),
      "invert": np.bool_(rng.random() < ranges["invert_prob"]),
      "background": (alpha * background).astype(np.float32),
      "noise": np.float32(uniform(rng, ranges["noise"])),
      "blur": np.float32(uniform(rng, ranges["blur"])),
      "label_prior": _dirichlet(rng, ranges["label_concentration"], 10).astype(np.float32),
      "motion_prior": motion_prior.astype(np.float32),
      "question_mix": _dirichlet(rng, ranges["question_concentration"],
                                 len(QUESTION_TYPES)).astype(np.float32),
  }


def _draw_labels(rng: np.random.Generator, shift: Mapping, n: int) -> tuple:
  """Each video's digit, motion direction and asked question type, from the device's priors."""
  digit = rng.choice(10, size=n, p=shift["label_prior"] / shift["label_prior"].sum())
  direction = rng.choice(4, size=n, p=shift["motion_prior"] / shift["motion_prior"].sum())
  qtype = rng.choice(len(QUESTION_TYPES), size=n,
                     p=shift["question_mix"] / shift["question_mix"].sum())
  return digit, direction, qtype


@functools.lru_cache(maxsize=None)
def _question_table(name: str, qlen: int) -> np.ndarray:
  """The tokens of each of a question type's templates [templates, qlen] (fixed: built once)."""
  table = np.stack([tokenize(t, qlen) for t in QUESTION_TEMPLATES[name]])
  table.flags.writeable = False
  return table


def _draw_questions(rng: np.random.Generator, n: int, qlen: int) -> np.ndarray:
  """Each video's wording of every question type, tokenised: [n, len(QUESTION_TYPES), qlen]."""
  questions = np.zeros((n, len(QUESTION_TYPES), qlen), np.int32)
  for q, name in enumerate(QUESTION_TYPES):
    which = rng.integers(len(QUESTION_TEMPLATES[name]), size=n)
    questions[:, q] = _question_table(name, qlen)[which]
  return questions


# A caption template's slots, as codes in its token program (token ids are >= 0).
_SLOTS = {"{t}": -1, "{d}": -2, "{m}": -3}
_DIGIT_FORM_IDS = np.array([[_CAPTION_ID.get(w, 1) for w in f] for f in DIGIT_FORMS], np.int32)
_DIRECTION_FORM_IDS = np.array([[_CAPTION_ID.get(w, 1) for w in f] for f in DIRECTION_FORMS],
                               np.int32)


@functools.lru_cache(maxsize=4096)
def _caption_program(template: str, clen: int) -> np.ndarray:
  """A caption template's tokens [clen] with its slots {t} {d} {m} left as codes (_SLOTS), so
  that filling them is a lookup: tokenize(template.format(...)) without the string work. Its
  slots are whole words (perturb_phrasing keeps them so), each filled by one word."""
  words = template.split()
  bad = [w for w in words if ("{" in w or "}" in w) and w not in _SLOTS]
  if bad:
    raise ValueError(f"caption template {template!r}: slots must be whole words {list(_SLOTS)}")
  ids = [_SLOTS.get(w, _CAPTION_ID.get(w, 1)) for w in words][:clen]
  program = np.array(ids + [0] * (clen - len(ids)), np.int32)
  program.flags.writeable = False
  return program


def _fill_captions(programs: np.ndarray, thick_id: int, digit_ids: np.ndarray,
                   direction_ids: np.ndarray) -> np.ndarray:
  """Captions [n, clen] from their programs [n, clen] and each caption's slot words' ids."""
  return np.where(programs == _SLOTS["{t}"], thick_id,
                  np.where(programs == _SLOTS["{d}"], digit_ids[:, None],
                           np.where(programs == _SLOTS["{m}"], direction_ids[:, None],
                                    programs))).astype(np.int32)


def _draw_captions(caption_rng: np.random.Generator, shift: Mapping, digit: np.ndarray,
                   direction: np.ndarray, phrasings: tuple, clen: int) -> np.ndarray:
  """Each video's caption, tokenised [n, clen]: a phrasing and word forms drawn from the
  device's caption style, perturbed on `wide_text` meta devices."""
  n = len(digit)
  thick_word = THICKNESS_WORDS[int(shift["thickness"])]
  def draw(key, k):                 # which phrasing / word form each caption uses
    mix = np.asarray(shift.get(key, np.eye(k)[0]), np.float64)[:k]
    return caption_rng.choice(k, size=n, p=mix / mix.sum())

  which = draw("caption_mix", len(phrasings))
  dform, mform = draw("digit_forms", len(DIGIT_FORMS)), draw("direction_forms",
                                                              len(DIRECTION_FORMS))
  if not n:
    return np.zeros((0, clen), np.int32)
  if "caption_unk" in shift:            # meta devices of `wide_text` only (see device_shift)
    programs = np.stack([_caption_program(
        perturb_phrasing(caption_rng, phrasings[w], float(shift["caption_unk"]),
                         float(shift["caption_shuffle"])), clen) for w in which])
  else:
    programs = np.stack([_caption_program(t, clen) for t in phrasings])[which]
  return _fill_captions(programs, _CAPTION_ID.get(thick_word, 1),
                        _DIGIT_FORM_IDS[dform, digit], _DIRECTION_FORM_IDS[mform, direction])


def render(rng: np.random.Generator, shift: Mapping, pool_by_class, images: np.ndarray, n: int,
           cfg: Mapping, caption_rng: np.random.Generator | None = None,
           phrasings: tuple = CAPTION_TEMPLATES) -> dict:
  """Renders n videos of one device. Returns every field; roles keep what they may show.

  Captions are phrased with `phrasings` (caption templates) drawn from `shift['caption_mix']`
  using `caption_rng` (a stream of its own, so the videos, questions and answers do not depend
  on it); `content` = digit * 4 + direction is what a caption says (the retrieval label)."""
  digit, direction, qtype = _draw_labels(rng, shift, n)
  video = digit_video.render_videos(rng, shift, pool_by_class, images, digit, direction, cfg)
  questions = _draw_questions(rng, n, int(cfg["question_len"]))
  caption_rng = caption_rng if caption_rng is not None else np.random.default_rng(0)
  captions = _draw_captions(caption_rng, shift, digit, direction, phrasings,
                            int(cfg["caption_len"]))
  answers = np.stack([digit, 10 + direction], axis=1).astype(np.int32)
  return {"video": video, "questions": questions, "answers": answers,
          "qtype": qtype.astype(np.int32), "caption": captions,
          "content": (digit * len(DIRECTIONS) + direction).astype(np.int32)}


def perturb_phrasing(rng: np.random.Generator, template: str, unk: float,
                     shuffle: float) -> str:
  """A phrasing no training caption uses, from a training one: with probability `shuffle` its
  words in a random order, then each of its own words (not the content slots {t} {d} {m})
  replaced by UNK, whose embedding no training caption reaches, with probability `unk`. What
  a caption says is kept; only how it says it changes, as in the OOD group's phrasings."""
  words = template.split()
  if rng.random() < shuffle:
    words = [words[i] for i in rng.permutation(len(words))]
  drop = rng.random(len(words)) < unk
  return " ".join(UNK if x and not w.startswith("{") else w for w, x in zip(words, drop))


def _asked(full: dict, labelled: bool) -> dict:
  """Keeps what a device sees: each video, the question the user asked of it and the caption
  a user typed to find it (unlabelled context too: the device has its users' queries, not
  which video answers them); answers and caption content only where the role is labelled.
  A caption states its video's answers: a QA task must never read context captions."""
  rows = np.arange(len(full["qtype"]))
  out = {"video": full["video"], "question": full["questions"][rows, full["qtype"]],
         "qtype": full["qtype"], "caption": full["caption"]}
  if labelled:
    out["answer"] = full["answers"][rows, full["qtype"]]
    out["content"] = full["content"]
  return out


def _rng(cfg, split, index, role=0):
  return np.random.default_rng([int(cfg["seed"]), SPLIT_CODES[split], int(index), role])


def _pool(cfg, split):
  images, _ = digits.load_mnist_5k()
  by_class = digits.instance_pools(int(cfg["seed"]))[SPLIT_POOL[split]]
  return images, by_class


def device_shift(cfg: Mapping, split: str, index: int) -> dict:
  images, by_class = _pool(cfg, split)
  ranges = split_ranges(cfg, split)
  mix = cfg.get("meta_wide")
  # A mixture for meta-training (cdc_robust `wide_mix`): a fraction of the meta devices draw
  # from wider ranges, the rest from the training ones (own RNG stream: nothing else moves).
  if split == "meta" and mix and _rng(cfg, split, index, META_MIX_CODE).random() < mix["fraction"]:
    ranges = {**ranges, **mix["shift"]}
  shift = sample_shift(_rng(cfg, split, index), ranges, int(cfg["size"]),
                       images[np.concatenate(by_class)])
  shift.update(caption_style(cfg, split, index))
  noise = cfg.get("caption_noise")
  if split == "meta" and noise:
    # Text-side domain randomisation for meta-training (cdc_robust `wide_text`): words the
    # model never learned (UNK) and unfamiliar word orders, never the OOD group's phrasings.
    rng = _rng(cfg, split, index, CAPTION_NOISE_CODE)
    shift["caption_unk"] = np.float32(uniform(rng, noise["unk"]))
    shift["caption_shuffle"] = np.float32(uniform(rng, noise["shuffle"]))
  return shift


def _render_role(cfg, split, index, role, shift, by_class, images, n):
  return render(_rng(cfg, split, index, ROLE_CODES[role]), shift, by_class, images, int(n), cfg,
                _rng(cfg, split, index, CAPTION_ROLE_OFFSET + ROLE_CODES[role]),
                caption_templates(split))


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
    full = _render_role(cfg, split, index, role, shift, by_class, images, n)
    out[role] = _asked(full, labelled=(role != "context"))
  return out


def make_global_train_device(cfg: Mapping, index: int, n: int) -> dict:
  """Pooled cloud training data of one global-train device: every question type per video."""
  images, by_class = _pool(cfg, "global_train")
  ranges = cfg["shift"]
  shift = sample_shift(_rng(cfg, "global_train", index), ranges, int(cfg["size"]),
                       images[np.concatenate(by_class)])
  shift.update(caption_style(cfg, "global_train", index))
  full = _render_role(cfg, "global_train", index, "train", shift, by_class, images, n)
  return {"video": full["video"], "questions": full["questions"], "answers": full["answers"],
          "caption": full["caption"], "content": full["content"]}


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
    full = _render_role(cfg, split, index, role, shift, by_class, images, n)
    out[role] = {k: full[k] for k in ("video", "questions", "answers", "caption", "content")}
  return out
