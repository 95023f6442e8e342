"""Encodings for what crosses the network (the uplink anchors, the downlink edit) and for the
device model itself: float32 (the reference), float16, int8 and int4 with one scale per row.

A *row* is the last axis of an array (an anchor; a row of a weight or edit matrix). The integer
encodings store round(x / s) with s = max|row| / qmax (qmax 127 for int8, 7 for int4, two int4
values to a byte) and send s as a float16 beside each row, so

    |x - decode(encode(x))| <= s / 2 = max|row| / (2 qmax)            per element,

and a row of zeros stays exactly zero (an unedited leaf is unedited after the round trip).
float16 keeps 11 significant bits: a relative error <= 2^-11 within its range. Everything here
is jittable and works on any pytree of arrays; integer arrays pass through untouched.
"""
import math

import jax
import jax.numpy as jnp

ENCODINGS = ("float32", "float16", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}
_BITS = {"float32": 32, "float16": 16, "int8": 8, "int4": 4}
SCALE_BYTES = 2                      # one float16 scale per row of an integer encoding


def check(encoding: str) -> str:
  if encoding not in ENCODINGS:
    raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
  return encoding


def roundtrip(x, encoding: str):
  """decode(encode(x)) for one array (float32 out); integer arrays are returned unchanged."""
  check(encoding)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or encoding == "float32":
    return x
  if encoding == "float16":
    return x.astype(jnp.float16).astype(x.dtype)
  q = _QMAX[encoding]
  rows = x.reshape(1, 1) if x.ndim == 0 else (x[None] if x.ndim == 1 else x)
  # the scale itself travels as float16: quantise with the value the receiver will see
  scale = (jnp.abs(rows).max(-1, keepdims=True) / q).astype(jnp.float16).astype(x.dtype)
  safe = jnp.where(scale > 0, scale, 1.0)
  out = jnp.clip(jnp.round(rows / safe), -q, q) * scale
  return out.reshape(x.shape)


def tree_roundtrip(tree, encoding: str):
  return jax.tree.map(lambda x: roundtrip(x, encoding), tree)


def max_error(x, encoding: str):
  """The bound on |x - roundtrip(x)| element by element (what the tests check)."""
  check(encoding)
  x = jnp.asarray(x, jnp.float32)
  if encoding == "float32":
    return jnp.zeros_like(x)
  if encoding == "float16":
    return jnp.abs(x) * 2.0 ** -11 + 2.0 ** -24       # + the smallest subnormal step
  rows = x.reshape(1, 1) if x.ndim == 0 else (x[None] if x.ndim == 1 else x)
  m = jnp.abs(rows).max(-1, keepdims=True)
  q = _QMAX[encoding]
  # half a step, plus float16 rounding of the scale (relative 2^-11 on every code up to qmax;
  # an absolute floor where the scale is float16-subnormal)
  bound = m / (2 * q) + m * 2.0 ** -11 * 1.1 + 2.0 ** -24 * (q + 1)
  return jnp.broadcast_to(bound, rows.shape).reshape(x.shape)


def encoded_bytes(values: float, row_length: float, encoding: str) -> float:
  """Bytes of `values` floats sent in rows of `row_length`: the packed codes plus, for the
  integer encodings, one float16 scale per row."""
  check(encoding)
  if values <= 0:
    return 0.0
  codes = math.ceil(values * _BITS[encoding] / 8)
  rows = math.ceil(values / max(row_length, 1)) if encoding in _QMAX else 0
  return float(codes + rows * SCALE_BYTES)


def bits(encoding: str) -> int:
  return _BITS[check(encoding)]
