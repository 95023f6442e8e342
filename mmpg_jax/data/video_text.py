"""Word vocabularies of real video datasets' questions and captions: lower-cased word tokens,
a vocabulary of the most frequent words (built from the cloud's devices only), word ids with
UNK for the rest."""
import collections
import re

import numpy as np

PAD, UNK = 0, 1


def tokenize(text: str) -> list:
  return re.findall(r"[a-z0-9']+", text.lower())


def word_vocab(texts, size: int) -> list:
  """['<pad>', '<unk>'] + the `size` - 2 most frequent words (ties: first appearance)."""
  counts, first = collections.Counter(), {}
  for t in texts:
    for w in tokenize(t):
      counts[w] += 1
      first.setdefault(w, len(first))
  return ["<pad>", "<unk>"] + sorted(counts, key=lambda w: (-counts[w], first[w]))[:size - 2]


def encode_text(text: str, index: dict, length: int) -> np.ndarray:
  """Word ids (UNK for unknown words), truncated or zero-padded to `length`."""
  ids = [index.get(w, UNK) for w in tokenize(text)][:length] or [UNK]
  out = np.zeros(length, np.int32)
  out[:len(ids)] = ids
  return out
