"""The DUET/Persona text format, so users can bring the MovieLens-1M and Amazon files that the
official code's data scripts produce (docs/methods.md):

    user;target;trigger_seq;click_seq;label

one row per (user, candidate item): `trigger_seq` and `click_seq` are `window` comma-separated
item ids (0 = padding, left-aligned), `label` is 1 for the clicked target and 0 for a sampled
negative. The rows of one target are contiguous: 1 + 4 in a training file, 1 + 99 in a test
file (the official metrics group rows by user with itertools.groupby, so they must be).

`read_rows` parses a file; `group_candidates` checks and stacks each target's block. Every
malformed line or block is an error that names the file and the line: nothing is dropped. A
row whose click_seq is all padding (a user's first click, which has no history) is kept, as
the official code keeps it (its model then reads the padding position); `empty_windows`
counts them so a report can say so.
"""
import os

import numpy as np


class FormatError(ValueError):
  """A line or block of a DUET/Persona text file is malformed."""


def _ints(field: str, what: str, where: str) -> list:
  try:
    return [int(v) for v in field.split(",")] if field.strip() else []
  except ValueError:
    raise FormatError(f"{where}: {what} {field[:60]!r} is not a comma-separated list of "
                      f"integer item ids") from None


def read_rows(path: str, window: int = 10) -> dict:
  """{'user', 'target', 'label' [N]; 'trigger', 'click' [N, window]; 'line' [N]} of a text
  file, in file order."""
  users, targets, triggers, clicks, labels, lines = [], [], [], [], [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue                      # a blank line (a trailing newline) carries no row
      where = f"{path}:{lineno}"
      parts = line.split(";")
      if len(parts) != 5:
        raise FormatError(f"{where}: {len(parts)} ';'-separated fields, expected 5 "
                          f"(user;target;trigger_seq;click_seq;label): {line[:80]!r}")
      user, target, trigger, click, label = parts
      try:
        u, t, lab = int(user), int(target), int(label)
      except ValueError:
        raise FormatError(f"{where}: user, target and label must be integers: "
                          f"{line[:80]!r}") from None
      if lab not in (0, 1):
        raise FormatError(f"{where}: label {lab}, expected 0 or 1")
      if t <= 0:
        raise FormatError(f"{where}: target item id {t}; ids start at 1 (0 is padding)")
      seqs = []
      for name, field in (("trigger_seq", trigger), ("click_seq", click)):
        ids = _ints(field, name, where)
        if len(ids) != window:
          raise FormatError(f"{where}: {name} has {len(ids)} ids, expected {window} "
                            f"(data.window)")
        if min(ids) < 0:
          raise FormatError(f"{where}: {name} holds a negative item id")
        seqs.append(ids)
      users.append(u)
      targets.append(t)
      triggers.append(seqs[0])
      clicks.append(seqs[1])
      labels.append(lab)
      lines.append(lineno)
  if not users:
    raise FormatError(f"{path} holds no rows")
  return {"user": np.asarray(users, np.int64), "target": np.asarray(targets, np.int32),
          "trigger": np.asarray(triggers, np.int32), "click": np.asarray(clicks, np.int32),
          "label": np.asarray(labels, np.float32), "line": np.asarray(lines, np.int64)}


def group_candidates(rows: dict, size: int, path: str) -> dict:
  """Stacks contiguous blocks of `size` rows, one block per target: {'user' [B], 'window'
  [B, window], 'candidates' [B, size], 'label' [B, size]}, positive moved first. A block must
  share its user and click window and hold exactly one positive."""
  n = len(rows["user"])
  if n % size:
    raise FormatError(f"{path}: {n} rows is not a whole number of {size}-row candidate blocks "
                      f"(1 positive + {size - 1} negatives each); the block at line "
                      f"{rows['line'][n - n % size]} is short")
  b = n // size
  user = rows["user"].reshape(b, size)
  click = rows["click"].reshape(b, size, -1)
  label = rows["label"].reshape(b, size)
  line = rows["line"].reshape(b, size)
  for i in range(b):
    if (user[i] != user[i, 0]).any() or (click[i] != click[i, 0]).any():
      j = int(np.flatnonzero((user[i] != user[i, 0]) | (click[i] != click[i, 0]).any(-1))[0])
      raise FormatError(f"{path}:{line[i, j]}: the block of {size} rows starting at line "
                        f"{line[i, 0]} mixes users or click windows: a target's candidates "
                        f"must be contiguous")
    if label[i].sum() != 1:
      raise FormatError(f"{path}:{line[i, 0]}: the block of {size} rows starting here holds "
                        f"{int(label[i].sum())} positives, expected exactly 1")
  first = np.argsort(-label, axis=1, kind="stable")            # the positive first
  take = lambda a: np.take_along_axis(a, first, axis=1)
  return {"user": user[:, 0], "window": click[:, 0],
          "candidates": take(rows["target"].reshape(b, size)), "label": take(label),
          "line": line[:, 0], "empty_windows": int((click[:, 0, 0] == 0).sum())}


# ---- the files as a seqrec data source -----------------------------------------------------------

TRAIN_FILE, TEST_FILE = "train.txt", "test.txt"


def file_fingerprint(manual_dir: str) -> list:
  """(path, size, mtime in ns) of the source files: a prepared copy (and the in-process cache)
  is made anew when they change."""
  out = []
  for name in (TRAIN_FILE, TEST_FILE):
    p = os.path.abspath(os.path.join(manual_dir, name))
    if os.path.exists(p):
      st = os.stat(p)
      out.append([p, st.st_size, st.st_mtime_ns])
  return out


class TextSource:
  """`data.manual_dir`/{train.txt, test.txt} in the official format as a seqrec data source
  (the protocol of `movielens.Prepared`: num_items, figures, describe, global_rows,
  eval_users, eval_device).

  * Users are numbered in order of first appearance; the vocabulary is 1..the largest id.
  * A user's training blocks are taken in file order as time order (the official scripts write
    them so); the files carry no timestamps, so time slices follow file order too.
  * Each user has at most one test block (its test target). `num_cold_users` seeded users with
    a test block form the cold group (test_ood): their training blocks never reach the cloud.
  * Validation (model selection only): a warm user's last training block, held out of the
    cloud's training rows; its positive is scored against `eval_negatives` negatives drawn
    (seeded) from items the user never clicked in either file, so validation and test rank
    1 + eval_negatives candidates alike.
  * A user's support is its training blocks before the target, newest first; a user with a
    test block and no training block keeps an empty support (masked: fine-tuning leaves it
    at the global model) and is counted in the figures (`users_without_history`).
  """

  def __init__(self, cfg):
    if int(cfg.get("max_users", 0) or 0):
      raise FormatError("data.max_users applies to MovieLens-100K only; set it to 0 for "
                        "data.name='seqrec_text' (use smaller files for a smaller run)")
    d = cfg.get("manual_dir", "") or ""
    paths = {"train": os.path.join(d, TRAIN_FILE), "test": os.path.join(d, TEST_FILE)}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if not d or missing:
      raise FormatError(
          f"data.manual_dir={d!r} must hold {TRAIN_FILE} and {TEST_FILE} in the DUET/Persona "
          f"text format (user;target;trigger_seq;click_seq;label), as the official data "
          f"scripts write them (missing: {missing or 'the directory'}); nothing is downloaded")
    w, self.cfg = int(cfg["window"]), cfg
    self.train = group_candidates(read_rows(paths["train"], w), 1 + int(cfg["train_negatives"]),
                                  paths["train"])
    self.test = group_candidates(read_rows(paths["test"], w), 1 + int(cfg["eval_negatives"]),
                                 paths["test"])
    raw = np.concatenate([self.train["user"], self.test["user"]])
    _, first = np.unique(raw, return_index=True)
    self.raw_users = raw[np.sort(first)]
    index = {int(u): i for i, u in enumerate(self.raw_users.tolist())}
    n = len(self.raw_users)
    train_user = np.asarray([index[int(u)] for u in self.train["user"]], np.int64)
    test_user = np.asarray([index[int(u)] for u in self.test["user"]], np.int64)
    counts = np.bincount(test_user, minlength=n)
    if (counts > 1).any():
      u = int(np.flatnonzero(counts > 1)[0])
      raise FormatError(f"{paths['test']}: user {self.raw_users[u]} has {counts[u]} test "
                        f"blocks; expected one test target per user")
    self.test_of = np.full(n, -1, np.int64)
    self.test_of[test_user] = np.arange(len(test_user))
    order = np.argsort(train_user, kind="stable")                        # file order per user
    self.blocks = np.split(order, np.cumsum(np.bincount(train_user, minlength=n))[:-1])
    self._check_time_order(paths)
    items = [self.train["window"], self.train["candidates"], self.test["window"],
             self.test["candidates"]]
    self._num_items = int(max(int(a.max()) for a in items))
    has_test = self.test_of >= 0
    n_cold = int(cfg["num_cold_users"])
    if not 0 <= n_cold < has_test.sum():
      raise FormatError(f"data.num_cold_users={n_cold} must leave warm test users "
                        f"({int(has_test.sum())} users have a test block)")
    self.cold = np.zeros(n, bool)
    self.cold[np.random.default_rng([int(cfg["seed"]), 4]).choice(
        np.flatnonzero(has_test), n_cold, replace=False)] = True
    self.has_test = has_test

  @property
  def num_items(self) -> int:
    return self._num_items

  def _check_time_order(self, paths) -> None:
    """File order must be time order (the files carry no time): each of a user's targets has
    the previous target's clicked item in its click window. Otherwise the held-out validation
    target would not be the latest, and later training windows would contain it."""
    tr, te = self.train, self.test
    for u, blocks in enumerate(self.blocks):
      pairs = [(tr, a, tr, b, paths["train"]) for a, b in zip(blocks[:-1], blocks[1:])]
      if len(blocks) and self.test_of[u] >= 0:
        pairs.append((tr, blocks[-1], te, self.test_of[u], paths["test"]))
      for src, a, dst, b, path in pairs:
        if src["candidates"][a][0] not in dst["window"][b]:
          raise FormatError(
              f"{path}:{dst['line'][b]}: this target's click window lacks the item clicked at "
              f"the user's previous target ({paths['train']}:{src['line'][a]}): the files "
              f"must list each user's targets in time order, as the official scripts write "
              f"them")

  def _validates(self, u) -> bool:
    return bool(self.has_test[u] and not self.cold[u] and len(self.blocks[u]) >= 1)

  def _cloud_blocks(self, u) -> np.ndarray:
    """A warm user's training blocks the cloud may train on (its validation block held out)."""
    if self.cold[u]:
      return self.blocks[u][:0]
    return self.blocks[u][:-1] if self._validates(u) else self.blocks[u]

  def eval_users(self, split) -> np.ndarray:
    n = len(self.raw_users)
    if split == "validation":
      return np.asarray([u for u in range(n) if self._validates(u)], np.int64)
    keep = self.cold if split == "test_ood" else ~self.cold
    return np.flatnonzero(keep & self.has_test)

  def _row(self, b) -> dict:
    return {k: self.train[k][b] for k in ("window", "candidates", "label")}

  def global_rows(self, cfg):
    for u in range(len(self.raw_users)):
      for k, b in enumerate(self._cloud_blocks(u)):
        yield u, k, dict(self._row(b), timestamp=np.int64(b))

  def _support(self, blocks) -> dict:
    s, nt = int(self.cfg["support_positions"]), 1 + int(self.cfg["train_negatives"])
    w = int(self.cfg["window"])
    out = {"window": np.zeros((s, w), np.int32), "candidates": np.zeros((s, nt), np.int32),
           "label": np.zeros((s, nt), np.float32), "mask": np.zeros(s, np.float32)}
    for i, b in enumerate(blocks[::-1][:s]):                   # newest first
      for k, v in self._row(b).items():
        out[k][i] = v
      out["mask"][i] = 1.0
    return out

  def eval_device(self, cfg, split, user) -> dict:
    blocks = self.blocks[user]
    if split == "validation":
      b = blocks[-1]
      pos = int(self.train["candidates"][b][0])
      target = {"window": self.train["window"][b],
                "candidates": np.concatenate([[pos], self._negatives(user)]).astype(np.int32),
                "label": np.eye(1, 1 + int(cfg["eval_negatives"]), dtype=np.float32)[0]}
      support, t = self._support(blocks[:-1]), b
    else:
      t = int(self.test_of[user])
      target = {k: self.test[k][t] for k in ("window", "candidates", "label")}
      support = self._support(blocks)
    return {"user": np.int32(user), "timestamp": np.int64(t), "target": target,
            "support": support}

  def _negatives(self, user) -> np.ndarray:
    clicked = np.zeros(self._num_items + 1, bool)
    for b in self.blocks[user]:
      clicked[self.train["window"][b]] = True
      clicked[self.train["candidates"][b][0]] = True
    if self.test_of[user] >= 0:
      t = self.test_of[user]
      clicked[self.test["window"][t]] = True
      clicked[self.test["candidates"][t][0]] = True
    clicked[0] = True
    pool = np.flatnonzero(~clicked)
    n = int(self.cfg["eval_negatives"])
    if len(pool) < n:
      raise FormatError(f"user {self.raw_users[user]} clicked all but {len(pool)} items: too "
                        f"few to draw {n} validation negatives; lower data.eval_negatives")
    return np.random.default_rng([int(self.cfg["seed"]), int(user), 7]).choice(
        pool, n, replace=False).astype(np.int32)

  def figures(self, cfg) -> dict:
    warm = ~self.cold
    rows = sum(len(self._cloud_blocks(u)) for u in range(len(self.raw_users)))
    return {"users": len(self.raw_users), "items": self._num_items,
            "train_blocks": len(self.train["user"]), "test_blocks": len(self.test["user"]),
            "warm_users": int(warm.sum()), "cold_users": int(self.cold.sum()),
            "training_positions": rows,
            "training_rows": rows * (1 + int(cfg["train_negatives"])),
            "validation_users": len(self.eval_users("validation")),
            "test_users": len(self.eval_users("test")),
            "test_ood_users": len(self.eval_users("test_ood")),
            "users_without_history": int(sum(1 for b in self.blocks if len(b) == 0)),
            "empty_windows": self.train["empty_windows"] + self.test["empty_windows"],
            "candidates_train": 1 + int(cfg["train_negatives"]),
            "candidates_eval": 1 + int(cfg["eval_negatives"])}

  def describe(self, cfg) -> str:
    f = self.figures(cfg)
    return (f"Files in the DUET/Persona text format from {cfg['manual_dir']}: {f['users']} "
            f"users, {f['items']} items, {f['train_blocks']} training targets (1 + "
            f"{cfg['train_negatives']} rows each) and {f['test_blocks']} test targets (1 + "
            f"{cfg['eval_negatives']}); {f['cold_users']} cold users (OOD) never seen by the "
            f"cloud; validation holds out each warm user's last training target, re-drawing "
            f"its negatives to 1 + {cfg['eval_negatives']} candidates; "
            f"{f['users_without_history']} users without training history, "
            f"{f['empty_windows']} targets with an empty click window (kept). The files carry "
            f"no time: file order is time order.")
