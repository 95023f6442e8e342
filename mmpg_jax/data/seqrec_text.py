"""The DUET/Persona text format, so users can bring the MovieLens-1M and Amazon files that the
official code's data scripts produce (reference/papers.md §2.3):

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
          "empty_windows": int((click[:, 0, 0] == 0).sum())}
