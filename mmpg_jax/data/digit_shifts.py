"""The shift ranges of the digit generators: a continuous range as (lo, hi) or a union of
intervals, one uniform draw from it, and the stated rule that widens a family's ranges
(cdc_robust's wide meta-training)."""
from typing import Mapping

import numpy as np

THICKNESS_WORDS = {-2: "faint", -1: "thin", 0: "plain", 1: "thick", 2: "bold", 3: "heavy"}


def intervals(r) -> tuple:
  """A continuous shift range as intervals: (lo, hi) or a union ((lo, hi), (lo, hi), ...)."""
  r = tuple(r)
  return tuple(tuple(float(x) for x in i) for i in r) if np.ndim(r[0]) else (
      (float(r[0]), float(r[1])),)


def uniform(rng: np.random.Generator, r) -> float:
  """A uniform draw from a range or a union of intervals (one RNG draw either way; a single
  (lo, hi) draws exactly as rng.uniform(lo, hi), so existing data is unchanged)."""
  iv = intervals(r)
  if len(iv) == 1:
    return rng.uniform(*iv[0])
  u = rng.uniform(0.0, sum(hi - lo for lo, hi in iv))
  for lo, hi in iv:
    if u <= hi - lo:
      return lo + u
    u -= hi - lo
  return iv[-1][1]


CONTINUOUS_SHIFTS = ("rotation", "clutter_alpha", "noise", "blur")


PROBABILITY_SHIFTS = ("invert_prob", "motion_preferred_prob")
CONCENTRATIONS = ("label_concentration", "question_concentration")


def widen(shift: Mapping, factor: float, families) -> dict:
  """The shift ranges of `families` widened by a stated `factor`, a rule that reads the
  training ranges only: a continuous range (lo, hi) -> (lo, lo + factor (hi - lo)); stroke
  thickness gains one step each side; clutter fragments x factor (rounded); a probability x
  factor (at most 1); a Dirichlet concentration / factor (more extreme priors). Returns the
  overrides of data.shift for those keys."""
  out = {}
  for key in families:
    v = shift[key]
    if key in CONTINUOUS_SHIFTS:
      out[key] = tuple((lo, round(lo + factor * (hi - lo), 9)) for lo, hi in intervals(v))
    elif key == "thickness":
      t = sorted(int(x) for x in v)
      out[key] = tuple(x for x in range(t[0] - 1, t[-1] + 2) if x in THICKNESS_WORDS)
    elif key == "clutter_fragments":
      out[key] = int(round(factor * int(v)))
    elif key in PROBABILITY_SHIFTS:
      out[key] = min(1.0, round(factor * float(v), 9))
    elif key in CONCENTRATIONS:
      out[key] = round(float(v) / factor, 9)
    else:
      raise ValueError(f"no widening rule for shift key {key!r}")
  return out
