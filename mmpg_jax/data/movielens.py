"""MovieLens-100K for sequential recommendation, preprocessed as the DUET/Persona line does
(docs/methods.md): a user is a device, the user's last clicks are its real-time data.

Source: the complete MovieLens-100K that the RecBole wheel ships
(`recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}`). The wheel is installed without
its dependencies (launch/_venv.sh) and never imported: `source_file` finds the files through
the package metadata. Nothing is downloaded at run time.

Preprocessing (a pure function of the data config, `preprocess`):
* Every rating is a click (implicit feedback, as the official data scripts). A user's clicks
  are sorted by time, ties kept in file order (a stable sort).
* Users with fewer than `min_interactions` clicks are dropped (default 5: a training position,
  a validation and a test target, and two clicks of history; every MovieLens-100K user has at
  least 20, so none is, and the report says how many were).
* `max_users` > 0 keeps only the first that many of them by raw id (smoke runs and tests);
  their figures count the rest as neither kept nor dropped.
* Item ids become 1..I in ascending order of the raw id; 0 is padding.
* `num_cold_users` users (seeded) form the cold group (`test_ood`): the global model and
  every meta-trained network never see any of their clicks.
* The click window of position t (1 <= t < n): the last `window` clicks before t, left-aligned
  with trailing 0s until the history is that long (the official code finds the last real
  position from that layout), then sliding.
* Leave one out by time, per warm user: positions 1..n-3 are training positions (the positive
  plus `train_negatives` sampled negatives, contiguous), n-2 is the validation target and n-1
  the test target (the positive plus `eval_negatives` negatives, contiguous, positive first).
  A cold user's evaluation target is its last click. Negatives are items the user never
  clicked, drawn without replacement by a generator seeded with (seed, user, position).
* A device's labelled support (on-device fine-tuning, the official `base_finetune`) is its
  most recent `support_positions` training positions, newest first, (1 + train_negatives rows each), with a
  mask where the user has fewer; for the test target this history includes the validation
  position (it lies in the past), for the validation target it does not.
"""
import dataclasses
import importlib.metadata
import os
from typing import Mapping

import numpy as np

GENERATOR_VERSION = "2"            # 2: support rows newest first
WHEEL = "recbole"
WHEEL_VERSION = "1.2.1"
FILES = {"inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
         "item": "recbole/dataset_example/ml-100k/ml-100k.item",
         "user": "recbole/dataset_example/ml-100k/ml-100k.user"}
SPLIT_CODES = {"global_train": 0, "validation": 1, "test": 2, "test_ood": 3, "cold": 4}


class SourceError(RuntimeError):
  """The packaged MovieLens files are missing or malformed."""


def source_file(kind: str) -> str:
  """The path of one packaged MovieLens-100K file, without importing recbole (it needs
  PyTorch)."""
  try:
    dist = importlib.metadata.distribution(WHEEL)
  except importlib.metadata.PackageNotFoundError:
    raise SourceError(
        f"MovieLens-100K comes from the {WHEEL}=={WHEEL_VERSION} wheel, which is not installed "
        f"in this environment. Run `pip install --no-deps {WHEEL}=={WHEEL_VERSION}` (the "
        f"launch scripts do; --no-deps keeps PyTorch out), or delete .venv and rerun "
        f"launch/local.sh.") from None
  path = str(dist.locate_file(FILES[kind]))
  if not os.path.exists(path):
    raise SourceError(f"{path} is missing from the installed {WHEEL} {dist.version} wheel "
                      f"(expected {WHEEL}=={WHEEL_VERSION}); reinstall it with `pip install "
                      f"--no-deps --force-reinstall {WHEEL}=={WHEEL_VERSION}`.")
  return path


def read_atomic(path: str, columns: tuple) -> dict:
  """A RecBole atomic file (tab-separated, header `name:type`): {column: [str]} for the
  requested columns, in file order; a malformed line names the file and the line."""
  with open(path, encoding="latin-1") as f:
    header = f.readline().rstrip("\n").split("\t")
    names = [h.split(":")[0] for h in header]
    missing = [c for c in columns if c not in names]
    if missing:
      raise SourceError(f"{path}: header {header} lacks column(s) {missing}")
    idx = [names.index(c) for c in columns]
    out = {c: [] for c in columns}
    for lineno, line in enumerate(f, start=2):
      parts = line.rstrip("\n").split("\t")
      if len(parts) != len(names):
        raise SourceError(f"{path}:{lineno}: {len(parts)} tab-separated fields, expected "
                          f"{len(names)} ({header})")
      for c, i in zip(columns, idx):
        out[c].append(parts[i])
  return out


def read_interactions(path: str) -> dict:
  """{'user', 'item', 'timestamp'} int64 arrays of the .inter file, in file order."""
  raw = read_atomic(path, ("user_id", "item_id", "timestamp"))
  out = {}
  for key, col in (("user", "user_id"), ("item", "item_id"), ("timestamp", "timestamp")):
    try:
      out[key] = np.asarray([int(float(v)) for v in raw[col]], np.int64)
    except ValueError as e:
      bad = next(i for i, v in enumerate(raw[col]) if not _is_number(v))
      raise SourceError(f"{path}:{bad + 2}: column {col} holds {raw[col][bad]!r}, not a "
                        f"number") from e
  if len(out["user"]) == 0:
    raise SourceError(f"{path} holds no interactions")
  return out


def _is_number(v: str) -> bool:
  try:
    float(v)
    return True
  except ValueError:
    return False


@dataclasses.dataclass
class Prepared:
  """The preprocessed clicks: per kept user, its item ids (1..I) in time order."""
  sequences: list            # [np.int32 array] per kept user, time order
  timestamps: list           # matching timestamps
  raw_users: np.ndarray      # the raw user id of each kept user
  raw_items: np.ndarray      # raw item id of item i+1
  cold: np.ndarray           # bool per kept user: in the cold (OOD) group
  dropped_users: int
  dropped_interactions: int

  @property
  def num_items(self) -> int:
    return len(self.raw_items)

  # The source protocol the TFDS builders and the task read (seqrec_text.TextSource too).
  def global_rows(self, cfg):
    return global_rows(self, cfg)

  def eval_users(self, split):
    return eval_users(self, split)

  def eval_device(self, cfg, split, user):
    return eval_device(self, cfg, split, user)

  def describe(self, cfg) -> str:
    f = self.figures(cfg)
    return (f"MovieLens-100K (RecBole's packaged copy), preprocessed as the DUET/Persona line: "
            f"{f['users']} users ({f['dropped_users']} dropped below {f['min_interactions']} "
            f"clicks), {f['items']} items, {f['interactions']} clicks; {f['warm_users']} warm "
            f"users give {f['training_positions']} training positions ({f['training_rows']} "
            f"rows: 1 + {cfg['train_negatives']} candidates each), and one validation and one "
            f"test target each (1 + {cfg['eval_negatives']} candidates); {f['cold_users']} cold "
            f"users (OOD) never seen by the cloud are tested at their last click.")

  def figures(self, cfg: Mapping) -> dict:
    """The preprocessing's figures for the report."""
    warm = ~self.cold
    n = np.asarray([len(s) for s in self.sequences])
    return {"users": int(len(n)), "items": self.num_items, "interactions": int(n.sum()),
            "dropped_users": self.dropped_users,
            "dropped_interactions": self.dropped_interactions,
            "min_interactions": int(cfg["min_interactions"]),
            "warm_users": int(warm.sum()), "cold_users": int(self.cold.sum()),
            "training_positions": int((n[warm] - 3).sum()),
            "training_rows": int((n[warm] - 3).sum()) * (1 + int(cfg["train_negatives"])),
            "validation_users": int(warm.sum()), "test_users": int(warm.sum()),
            "test_ood_users": int(self.cold.sum()),
            "candidates_train": 1 + int(cfg["train_negatives"]),
            "candidates_eval": 1 + int(cfg["eval_negatives"])}


def preprocess(cfg: Mapping, inter_path: str | None = None) -> Prepared:
  """The preprocessing of the module docstring, a pure function of (cfg, the file)."""
  inter = read_interactions(inter_path or source_file("inter"))
  order = np.lexsort((np.arange(len(inter["user"])), inter["timestamp"], inter["user"]))
  users, items, ts = inter["user"][order], inter["item"][order], inter["timestamp"][order]
  raw_users, starts, counts = np.unique(users, return_index=True, return_counts=True)
  keep = counts >= int(cfg["min_interactions"])
  dropped_users, dropped_rows = int((~keep).sum()), int(counts[~keep].sum())
  if cfg.get("max_users", 0):          # a smoke-sized subset: the first users by raw id
    keep &= np.cumsum(keep) <= int(cfg["max_users"])
  kept_rows = np.concatenate([np.arange(s, s + c) for s, c, k in zip(starts, counts, keep) if k]
                             ) if keep.any() else np.zeros(0, np.int64)
  if not keep.any():
    raise SourceError(f"no user has data.min_interactions={cfg['min_interactions']} clicks; "
                      f"lower it (at least 5: a training, a validation and a test target)")
  raw_items, item_ids = np.unique(items[kept_rows], return_inverse=True)
  item_of_row = np.zeros(len(items), np.int64)
  item_of_row[kept_rows] = item_ids + 1
  seqs, times = [], []
  for s, c, k in zip(starts, counts, keep):
    if k:
      seqs.append(item_of_row[s:s + c].astype(np.int32))
      times.append(ts[s:s + c])
  n_users = len(seqs)
  n_cold = int(cfg["num_cold_users"])
  if not 0 <= n_cold < n_users:
    raise SourceError(f"data.num_cold_users={n_cold} must leave warm users ({n_users} kept)")
  cold = np.zeros(n_users, bool)
  cold[np.random.default_rng([int(cfg["seed"]), SPLIT_CODES["cold"]]).choice(
      n_users, n_cold, replace=False)] = True
  return Prepared(seqs, times, raw_users[keep], raw_items, cold,
                  dropped_users=dropped_users, dropped_interactions=dropped_rows)


def click_window(seq: np.ndarray, t: int, window: int) -> np.ndarray:
  """The last `window` clicks before position t, left-aligned, trailing 0 padding."""
  hist = seq[max(0, t - window):t]
  out = np.zeros(window, np.int32)
  out[:len(hist)] = hist
  return out


def sample_negatives(seq: np.ndarray, num_items: int, n: int, seed: int, user: int,
                     t: int) -> np.ndarray:
  """n distinct items (1..num_items) the user never clicked, a function of (seed, user, t)."""
  clicked = np.zeros(num_items + 1, bool)
  clicked[seq] = True
  clicked[0] = True
  pool = np.flatnonzero(~clicked)
  if len(pool) < n:
    raise SourceError(f"user {user} clicked all but {len(pool)} of {num_items} items: too few "
                      f"to sample {n} negatives; lower data.eval_negatives")
  return np.random.default_rng([seed, user, t]).choice(pool, n, replace=False).astype(np.int32)


def position(prep: Prepared, cfg: Mapping, user: int, t: int, negatives: int) -> dict:
  """One target of a user: its click window, candidates (positive first, then negatives,
  contiguous) and labels."""
  seq = prep.sequences[user]
  neg = sample_negatives(seq, prep.num_items, negatives, int(cfg["seed"]), user, t)
  labels = np.zeros(1 + negatives, np.float32)
  labels[0] = 1.0
  return {"window": click_window(seq, t, int(cfg["window"])),
          "candidates": np.concatenate([seq[t:t + 1], neg]).astype(np.int32),
          "label": labels, "timestamp": np.int64(prep.timestamps[user][t])}


def training_positions(prep: Prepared, user: int) -> range:
  """A warm user's training positions: 1..n-3 (n-2 validates, n-1 tests)."""
  return range(1, len(prep.sequences[user]) - 2)


def eval_position(prep: Prepared, user: int, split: str) -> int:
  n = len(prep.sequences[user])
  return n - 2 if split == "validation" else n - 1


def eval_users(prep: Prepared, split: str) -> np.ndarray:
  return np.flatnonzero(prep.cold if split == "test_ood" else ~prep.cold)


def support(prep: Prepared, cfg: Mapping, user: int, before: int) -> dict:
  """The user's most recent `support_positions` labelled positions before `before` (1 + train
  negatives rows each), most recent first (so the first k rows, what fta_k reads, are the
  newest); `mask` [S] is 0 where the user has fewer (at the end)."""
  s, neg = int(cfg["support_positions"]), int(cfg["train_negatives"])
  ts = list(range(1, before))[-s:][::-1]
  rows = [position(prep, cfg, user, t, neg) for t in ts]
  w = int(cfg["window"])
  out = {"window": np.zeros((s, w), np.int32), "candidates": np.zeros((s, 1 + neg), np.int32),
         "label": np.zeros((s, 1 + neg), np.float32), "mask": np.zeros(s, np.float32)}
  for i, r in enumerate(rows):
    for k in ("window", "candidates", "label"):
      out[k][i] = r[k]
    out["mask"][i] = 1.0
  return out


def eval_device(prep: Prepared, cfg: Mapping, split: str, user: int) -> dict:
  """One evaluation device: the user's target at the split's position (1 + eval negatives
  candidates) with its click window, and its labelled support from its own history."""
  t = eval_position(prep, user, split)
  target = position(prep, cfg, user, t, int(cfg["eval_negatives"]))
  return {"user": np.int32(user), "timestamp": target.pop("timestamp"),
          "target": target, "support": support(prep, cfg, user, t)}


def global_rows(prep: Prepared, cfg: Mapping):
  """The cloud's training positions (warm users only), user-major, time order: yields
  (user, t, position dict)."""
  neg = int(cfg["train_negatives"])
  for u in np.flatnonzero(~prep.cold):
    for t in training_positions(prep, int(u)):
      yield int(u), t, position(prep, cfg, int(u), t, neg)
