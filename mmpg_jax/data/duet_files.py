r"""MovieLens-100K written as the official DUET/Persona data scripts write it: `train.txt` and
`test.txt` in the text format `data/seqrec_text.py` reads (user;target;trigger_seq;click_seq;
label), so a figure from the official code and one from this codebase can be put on the same
files.

  python -m mmpg_jax.data.duet_files --out=DIR [--seed=0] [--max_users=0]
  python -m mmpg_jax.main --config=configs/seqrec_movielens.py:official \
      --config.data.name=seqrec_text --config.data.manual_dir=DIR

The rules (the official scripts'; `movielens.preprocess` with no cold users): every rating is a
click, a user's clicks in time order, items numbered 1..I by sorted raw id, users by their raw
id. Every position t = 1..n-2 of a user is a training target (the positive and 4 negatives),
the last click n-1 the test target (the positive and 99 negatives); negatives are items the user
never clicked, drawn by `movielens.sample_negatives` (seeded by seed, user, position: the very
negatives the packaged source uses). `click_seq` is the window of the last 10 clicks before t
(left-aligned, 0-padded), `trigger_seq` the window before t - 1. Reading the files back with
`data.name="seqrec_text"` holds each user's last training target out for validation, so the
cloud trains on the same targets, with the same negatives, as the packaged source under the
official protocol, and the test targets are the same (a test checks both).
"""
import os

from absl import app, flags

from mmpg_jax.data import movielens as ml
from mmpg_jax.data import seqrec_text

def data_config(seed: int = 0, max_users: int = 0) -> dict:
  """The preprocessing's settings for the official files: every user warm."""
  return {"seed": seed, "min_interactions": 5, "num_cold_users": 0, "max_users": max_users,
          "window": 10, "train_negatives": 4, "eval_negatives": 99}


def _lines(prep, cfg, user: int, t: int, negatives: int) -> list:
  seq, w = prep.sequences[user], int(cfg["window"])
  row = ml.position(prep, cfg, user, t, negatives)
  click = ",".join(str(int(i)) for i in row["window"])
  trigger = ",".join(str(int(i)) for i in ml.click_window(seq, t - 1, w))
  uid = int(prep.raw_users[user])
  return [f"{uid};{int(item)};{trigger};{click};{int(label)}"
          for item, label in zip(row["candidates"], row["label"])]


def write(out_dir: str, cfg: dict, prep=None) -> dict:
  """Writes DIR/train.txt and DIR/test.txt; returns their figures."""
  prep = prep if prep is not None else ml.preprocess(cfg)
  if prep.cold.any():
    raise ValueError("the official files have no cold users: set num_cold_users=0")
  os.makedirs(out_dir, exist_ok=True)
  n_train = n_test = 0
  paths = {k: os.path.join(out_dir, f) for k, f in (("train", seqrec_text.TRAIN_FILE),
                                                     ("test", seqrec_text.TEST_FILE))}
  # written beside, then renamed: a killed writer leaves no half file under the real name
  with open(paths["train"] + ".tmp", "w") as tr, open(paths["test"] + ".tmp", "w") as te:
    for u, seq in enumerate(prep.sequences):
      for t in range(1, len(seq) - 1):
        tr.write("\n".join(_lines(prep, cfg, u, t, int(cfg["train_negatives"]))) + "\n")
        n_train += 1
      te.write("\n".join(_lines(prep, cfg, u, len(seq) - 1, int(cfg["eval_negatives"])))
               + "\n")
      n_test += 1
  for p in paths.values():
    os.replace(p + ".tmp", p)
  return {"users": len(prep.sequences), "items": prep.num_items, "train_targets": n_train,
          "test_targets": n_test, "train_rows": n_train * (1 + int(cfg["train_negatives"])),
          "test_rows": n_test * (1 + int(cfg["eval_negatives"]))}


def main(argv):
  del argv
  out = flags.FLAGS.out
  if not out:
    raise app.UsageError("--out=DIR is required")
  f = write(out, data_config(flags.FLAGS.seed, flags.FLAGS.max_users))
  print(f"wrote {out}/train.txt ({f['train_targets']:,} targets, {f['train_rows']:,} "
        f"rows) and test.txt ({f['test_targets']:,} targets, {f['test_rows']:,} rows): "
        f"{f['users']:,} users, {f['items']:,} items")


if __name__ == "__main__":
  # defined here, not on import: another module's --out (video_fixtures) may share a process
  flags.DEFINE_string("out", None, "folder to write train.txt and test.txt into")
  flags.DEFINE_integer("seed", 0, "negative sampling seed (data.seed)")
  flags.DEFINE_integer("max_users", 0, "0 = every user; else the first N by raw id")
  app.run(main)
