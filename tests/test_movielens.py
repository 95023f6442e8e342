"""MovieLens-100K from the RecBole wheel (data/movielens.py, data/tfds_movielens.py) and the
DUET/Persona text format (data/seqrec_text.py)."""
import importlib.metadata
import sys

import numpy as np
import pytest

from mmpg_jax.data import movielens as ml
from mmpg_jax.data import seqrec_text as st

CFG = dict(seed=0, min_interactions=5, num_cold_users=94, window=10, train_negatives=4,
           eval_negatives=99, support_positions=10, max_users=0)


@pytest.fixture(scope="module")
def prep():
  return ml.preprocess(CFG)


def test_the_packaged_movielens_100k_is_read_whole_without_importing_recbole(prep):
  f = prep.figures(CFG)
  assert (f["users"], f["items"], f["interactions"]) == (943, 1682, 100000)
  assert f["dropped_users"] == 0                      # every ML-100K user has >= 20 clicks
  assert f["warm_users"] + f["cold_users"] == 943 and f["cold_users"] == 94
  # a warm user of n clicks gives n - 3 training positions (validation n-2, test n-1)
  assert f["training_positions"] == 100000 - sum(
      len(s) for s, c in zip(prep.sequences, prep.cold) if c) - 3 * f["warm_users"]
  assert "recbole" not in sys.modules
  for s, t in zip(prep.sequences, prep.timestamps):
    assert (np.diff(t) >= 0).all() and s.min() >= 1 and s.max() <= 1682


def test_candidate_structure_1_plus_4_in_training_1_plus_99_at_test_contiguous_per_user(prep):
  rows = list(ml.global_rows(prep, CFG))
  assert len(rows) == prep.figures(CFG)["training_positions"]
  users = np.asarray([u for u, _, _ in rows])
  assert (np.diff(users) >= 0).all()                  # user-major: a user's rows contiguous
  assert not prep.cold[np.unique(users)].any()        # the cold users never reach the cloud
  for u, t, pos in rows[:500]:
    seq = prep.sequences[u]
    assert pos["candidates"].shape == (5,) and pos["label"].tolist() == [1, 0, 0, 0, 0]
    assert pos["candidates"][0] == seq[t]
    assert not np.isin(pos["candidates"][1:], seq).any()          # negatives never clicked
    assert len(set(pos["candidates"].tolist())) == 5
    # the click window: the last 10 clicks before t, left-aligned, trailing zero padding
    hist = seq[max(0, t - 10):t]
    np.testing.assert_array_equal(pos["window"][:len(hist)], hist)
    assert (pos["window"][len(hist):] == 0).all() and 1 <= t <= len(seq) - 3
  for split in ("validation", "test", "test_ood"):
    users = ml.eval_users(prep, split)
    assert len(users) == (94 if split == "test_ood" else 849)
    for u in users[:20]:
      d = ml.eval_device(prep, CFG, split, int(u))
      seq = prep.sequences[u]
      t = len(seq) - (2 if split == "validation" else 1)
      c = d["target"]["candidates"]
      assert c.shape == (100,) and c[0] == seq[t] and len(set(c.tolist())) == 100
      assert d["target"]["label"].sum() == 1 and d["target"]["label"][0] == 1
      assert not np.isin(c[1:], seq).any()
      # support: the user's own labelled positions strictly before the target
      assert d["support"]["mask"].sum() == min(10, t - 1)
      assert (d["support"]["candidates"][:, 0][d["support"]["mask"] > 0]
              == seq[max(1, t - 10):t][::-1]).all()                 # newest first


def test_preprocessing_is_a_function_of_the_seed(prep):
  again = ml.preprocess(CFG)
  np.testing.assert_array_equal(again.cold, prep.cold)
  a = ml.eval_device(prep, CFG, "test", 3)["target"]["candidates"]
  np.testing.assert_array_equal(a, ml.eval_device(again, CFG, "test", 3)["target"]["candidates"])
  other = ml.preprocess(dict(CFG, seed=1))
  assert not np.array_equal(other.cold, prep.cold)


def test_tfds_builders_store_what_the_preprocessing_gives(tmp_path):
  from mmpg_jax.data import pipeline, tfds_movielens as tml
  cfg = dict(CFG, max_users=12, num_cold_users=2, eval_negatives=19)
  bench = pipeline.prepare(cfg, str(tmp_path), builders=(tml.MovielensCloud,
                                                         tml.MovielensDevices))
  prep = tml.prepared(cfg)
  src = bench.global_source()
  rows = list(ml.global_rows(prep, cfg))
  assert len(src) == len(rows) == prep.figures(cfg)["training_positions"]
  for i in (0, len(rows) - 1):
    np.testing.assert_array_equal(src[i]["candidates"], rows[i][2]["candidates"])
  test = bench.devices("test")
  assert test["target"]["candidates"].shape == (10, 20)
  np.testing.assert_array_equal(test["user"], ml.eval_users(prep, "test"))
  assert bench.devices("test_ood")["user"].tolist() == ml.eval_users(prep, "test_ood").tolist()


def test_fewer_clicks_than_the_threshold_drop_the_user_and_the_report_counts_it(tmp_path):
  path = tmp_path / "tiny.inter"
  lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
  lines += [f"1\t{i}\t3\t{100 + i}" for i in range(1, 8)]          # 7 clicks: kept
  lines += [f"2\t{i}\t4\t{200 - i}" for i in range(1, 4)]          # 3 clicks: dropped
  path.write_text("\n".join(lines) + "\n")
  p = ml.preprocess(dict(CFG, num_cold_users=0, eval_negatives=1), str(path))
  assert (p.dropped_users, p.dropped_interactions, len(p.sequences)) == (1, 3, 1)
  assert p.sequences[0].tolist() == list(range(1, 8))


@pytest.mark.parametrize("body,match", [
    ("1\t2\t3\n", "3 tab-separated fields, expected 4"),
    ("1\tx\t3\t4\n", "column item_id holds 'x'"),
])
def test_a_malformed_atomic_line_names_the_file_and_line(tmp_path, body, match):
  path = tmp_path / "bad.inter"
  path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                  "1\t2\t3\t4\n" + body)
  with pytest.raises(ml.SourceError, match=f"bad.inter:3: .*{match}"):
    ml.preprocess(dict(CFG, num_cold_users=0), str(path))


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "distribution", missing)
  with pytest.raises(ml.SourceError, match="pip install --no-deps recbole==1.2.1"):
    ml.source_file("inter")


# ---- the DUET/Persona text format ---------------------------------------------------------------

def _line(user, target, click, label, trigger=None):
  fmt = lambda s: ",".join(str(v) for v in s)
  return f"{user};{target};{fmt(trigger or [0] * 10)};{fmt(click)};{label}"


def _fixture(tmp_path, name="train.txt", size=5, users=(7, 9), empty_first=False):
  """A file in the official format: per user two targets of `size` rows, positive first."""
  lines = []
  for u in users:
    for k in range(2):
      click = [0] * 10 if (empty_first and k == 0) else [u, u + 1, k + 3] + [0] * 7
      lines.append(_line(u, 100 + k, click, 1))
      lines += [_line(u, 200 + j, click, 0) for j in range(size - 1)]
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return path


def test_the_text_format_reads_into_contiguous_candidate_blocks(tmp_path):
  path = _fixture(tmp_path, empty_first=True)
  rows = st.read_rows(str(path))
  assert rows["click"].shape == (20, 10) and rows["label"].sum() == 4
  g = st.group_candidates(rows, 5, str(path))
  assert g["user"].tolist() == [7, 7, 9, 9]
  assert g["candidates"].shape == (4, 5) and (g["label"][:, 0] == 1).all()
  assert g["candidates"][1].tolist() == [101, 200, 201, 202, 203]
  np.testing.assert_array_equal(g["window"][1, :3], [7, 8, 4])
  assert g["empty_windows"] == 2                    # kept and counted, not dropped
  # a positive that is not first is moved first; the negatives keep their order
  lines = path.read_text().splitlines()
  lines[0], lines[2] = lines[2], lines[0]
  path.write_text("\n".join(lines) + "\n")
  g2 = st.group_candidates(st.read_rows(str(path)), 5, str(path))
  assert g2["candidates"][0].tolist() == [100, 201, 200, 202, 203]


@pytest.mark.parametrize("lineno,bad,match", [
    (3, "7;100;0,0,0,0,0,0,0,0,0,0;7,8,3,0,0,0,0,0,0,0", "4 ';'-separated fields"),
    (3, "7;100;0,0,0,0,0,0,0,0,0,0;7,8,3;0", "click_seq has 3 ids, expected 10"),
    (3, "7;100;0,0,0,0,0,0,0,0,0,0;7,8,x,0,0,0,0,0,0,0;0", "not a comma-separated list"),
    (3, "7;100;0,0,0,0,0,0,0,0,0,0;7,8,3,0,0,0,0,0,0,0;2", "label 2, expected 0 or 1"),
    (3, "7;0;0,0,0,0,0,0,0,0,0,0;7,8,3,0,0,0,0,0,0,0;0", "target item id 0"),
])
def test_a_malformed_text_line_names_the_file_and_line(tmp_path, lineno, bad, match):
  path = _fixture(tmp_path)
  lines = path.read_text().splitlines()
  lines[lineno - 1] = bad
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(st.FormatError, match=f"train.txt:{lineno}: .*{match}"):
    st.read_rows(str(path))


def test_broken_candidate_blocks_are_refused_with_their_line(tmp_path):
  path = _fixture(tmp_path)
  lines = path.read_text().splitlines()
  with pytest.raises(st.FormatError, match="not a whole number of 3-row"):
    st.group_candidates(st.read_rows(str(path)), 3, str(path))
  lines[3] = lines[3][:-1] + "1"                       # a second positive in block 1
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(st.FormatError, match="train.txt:1: .*holds 2 positives"):
    st.group_candidates(st.read_rows(str(path)), 5, str(path))
  lines = _fixture(tmp_path).read_text().splitlines()
  lines[4] = lines[4].replace("7;", "9;", 1)           # another user mid-block
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(st.FormatError, match="train.txt:5: .*mixes users"):
    st.group_candidates(st.read_rows(str(path)), 5, str(path))
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(st.FormatError, match="holds no rows"):
    st.read_rows(str(tmp_path / "empty.txt"))
