"""Devices formed from a real video dataset itself: which device each video
belongs to, and which devices play which role.

* MSRVTT: a device is one of the 20 video categories of its video info file (`categories`).
* MSVD has no categories: a device is a k-means cluster of the videos' mean frame embedding
  (L2-normalised, k-means++ then Lloyd steps in JAX, seeded: `clusters`); the centres are
  recorded with the built data.
* `assign_roles` splits the devices, disjointly and seeded, into global-training,
  meta-training, validation and test devices, so a device's shift (its category or cluster)
  is never seen in training before it is evaluated.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.core import kmeans as km
from mmpg_jax.data import video_files as vf
from mmpg_jax.data.video_files import VideoDataError

ROLES = ("global", "meta", "validation", "test")


def categories(info: dict, video_ids) -> np.ndarray:
  """MSRVTT: each video's category (0..19) from `video_files.read_msrvtt_info`."""
  missing = [v for v in video_ids if v not in info["category"]]
  if missing:
    raise VideoDataError(f"{len(missing)} video(s) have no category in the video info file "
                         f"(e.g. {missing[:3]}); use the info file of the same MSRVTT release")
  return np.asarray([info["category"][v] for v in video_ids], np.int32)


def mean_embedding(x: np.ndarray) -> np.ndarray:
  """A video's mean frame feature, L2-normalised (CLIP features compare by angle)."""
  m = x.mean(0)
  return m / max(float(np.linalg.norm(m)), 1e-12)


def clusters(store, video_ids, k: int, seed: int, iterations: int = 50) -> tuple:
  """MSVD: (device of each video [n], centres [k, D]) by k-means of mean embeddings."""
  if not 1 <= k <= len(video_ids):
    raise VideoDataError(f"{k} devices need 1 <= k <= the {len(video_ids)} videos with "
                         f"features; lower data.num_devices")
  x = jnp.asarray(np.stack([mean_embedding(store.get(v))
                           for v in vf.logged(video_ids, "k-means: reading features")]))
  centres, labels = jax.jit(km.kmeans, static_argnums=(1, 2))(x, k, iterations,
                                                            jax.random.key(seed))
  labels = np.asarray(labels, np.int32)
  sizes = np.bincount(labels, minlength=k)
  if (sizes == 0).any():        # duplicate embeddings can leave a cluster empty: no device
    raise VideoDataError(f"k-means left {int((sizes == 0).sum())} of {k} devices without a "
                         f"video (sizes {sizes.tolist()}); lower data.num_devices or change "
                         f"data.seed")
  return labels, np.asarray(centres)


def nearest_centre(store, video_ids, centres) -> np.ndarray:
  """The device of each video: the nearest k-means centre to its mean embedding. k-means is
  fit on the training split's videos only; held-out videos are assigned to its centres."""
  x = np.stack([mean_embedding(store.get(v))
                for v in vf.logged(video_ids, "devices: reading features")])
  d2 = ((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1)
  return d2.argmin(1).astype(np.int32)


def assign_roles(num_devices: int, counts: dict, seed: int) -> dict:
  """{role: sorted device ids}: disjoint, a seeded permutation cut in ROLES order by
  `counts` ({role: number of devices}; every role needs at least one)."""
  bad = [r for r in ROLES if int(counts.get(r, 0)) < 1]
  if bad:
    raise VideoDataError(f"every device role needs at least one device; {bad} have none "
                         f"(data.num_global_devices, num_meta_devices, num_val_devices, "
                         f"num_test_devices)")
  total = sum(int(counts[r]) for r in ROLES)
  if total > num_devices:
    raise VideoDataError(f"the device roles ask for {total} devices "
                         f"({dict((r, int(counts[r])) for r in ROLES)}) but the data gives "
                         f"{num_devices}; lower data.num_global_devices, num_meta_devices, "
                         f"num_val_devices or num_test_devices")
  perm = np.random.default_rng([int(seed), 17]).permutation(num_devices)
  out, at = {}, 0
  for r in ROLES:
    out[r] = np.sort(perm[at:at + int(counts[r])])
    at += int(counts[r])
  return out
