"""Faults and bad input at every boundary: damaged checkpoints, damaged data, full disks,
invalid configs (kills are in test_entry_point.py). Each asserts the error and that nothing on
disk was lost."""
import errno
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import assert_refused_before_any_work
from conftest import checkpoint_steps as _steps

from mmpg_jax import tasks
from mmpg_jax.core import checkpointing
from mmpg_jax.core import workdir as wd
from mmpg_jax.data import pipeline
from mmpg_jax.training import train

# ---------- damaged checkpoints ---------------------------------------------------------------

def _train(cfg, bench, workdir):
  task = tasks.build(cfg)
  model = task.build_model()
  return train.train_global(task, model, cfg, bench, str(workdir),
                            wd.MetricsWriter(str(workdir)))[0]


def _truncate(step_dir):
  """Every array data file of the step cut to half (a partially written checkpoint). Which of
  orbax's data folders a restore reads varies, so all are cut; the metadata is left alone."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.path.basename(r) == "d"]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _scramble(step_dir):
  rng = np.random.default_rng(0)
  for r, _, fs in os.walk(os.path.join(step_dir, "state", "ocdbt.process_0", "d")):
    for name in fs:
      path = os.path.join(r, name)
      data = bytearray(open(path, "rb").read())
      lo = len(data) // 3
      data[lo:lo + 64] = rng.integers(0, 256, min(64, len(data) - lo), dtype=np.uint8).tobytes()
      open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _scramble])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_good_step(
    smoke_config, bench, tmp_path, damage):
  ref = _train(smoke_config, bench, tmp_path / "ref")        # steps 3 and 6, uninterrupted
  ck = tmp_path / "ref" / "checkpoints" / "global"
  assert _steps(ck) == [3, 6]
  damage(str(ck / "6"))
  again = _train(smoke_config, bench, tmp_path / "ref")      # resumes from 3, retrains 4..6
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               ref, again)
  kept = tmp_path / "ref" / "checkpoints" / "global_damaged" / "step_6"
  assert kept.is_dir()                                        # moved aside, not deleted
  assert _steps(ck) == [3, 6]


def test_no_usable_checkpoint_says_so_and_where(smoke_config, bench, tmp_path):
  _train(smoke_config, bench, tmp_path)
  ck = tmp_path / "checkpoints" / "global"
  for s in _steps(ck):
    _scramble(str(ck / str(s)))
  with pytest.raises(checkpointing.CheckpointCorruptError,
                     match=r"no usable global checkpoint in .*checkpoints/global(.|\n)*step 6"
                           r"(.|\n)*step 3(.|\n)*Delete"):
    _train(smoke_config, bench, tmp_path)
  assert _steps(ck) == [3, 6]                                 # nothing removed


# ---------- damaged data ----------------------------------------------------------------------

def _shards(d, split):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                if f.startswith(f"moving_digits_devices-{split}.array_record"))


@pytest.mark.parametrize("fault", ["missing", "truncated", "malformed"])
def test_damaged_data_files_get_a_clear_error(smoke_config, data_dir, tmp_path, fault):
  copy = tmp_path / "data"
  shutil.copytree(data_dir, copy)
  shard = _shards(copy, "test")[0]
  if fault == "missing":
    os.remove(shard)
  elif fault == "truncated":
    with open(shard, "r+b") as f:
      f.truncate(os.path.getsize(shard) // 3)
  else:
    open(shard, "wb").write(b"this is not an array_record file" * 100)
  with pytest.raises(pipeline.DataError, match=r"damaged or incomplete(.|\n)*Delete that folder"):
    pipeline.prepare(smoke_config.data, str(copy))


# ---------- full disk, unwritable files -------------------------------------------------------

def test_a_failing_write_keeps_the_previous_file(tmp_path, monkeypatch):
  path = str(tmp_path / "results.json")
  wd.write_json(path, {"v": 1})
  real_dump = json.dump

  def full_disk(obj, f, **kw):
    real_dump(obj, f, **kw)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(json, "dump", full_disk)
  with pytest.raises(wd.WorkdirError, match=r"No space left on device(.|\n)*previous version is "
                                            r"untouched"):
    wd.write_json(path, {"v": 2})
  assert json.loads(open(path).read()) == {"v": 1}
  assert not os.path.exists(path + ".tmp")


def test_a_failing_checkpoint_write_names_the_step_and_keeps_earlier_ones(smoke_config, bench,
                                                                          tmp_path, monkeypatch):
  _train(smoke_config, bench, tmp_path)
  cfg = smoke_config.copy_and_resolve_references()
  cfg.train.num_steps = 9
  import orbax.checkpoint as ocp

  def full_disk(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(OSError, match=r"could not write the global checkpoint of step 9(.|\n)*"
                                    r"earlier checkpoints are untouched"):
    _train(cfg, bench, tmp_path)
  assert _steps(tmp_path / "checkpoints" / "global") == [3, 6]


# ---------- invalid config values -------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("adr.k", 500, r"config.adr.k=500 is invalid: K must be between 1 and the 56"),
    ("adr.k_sweep", (1, 0), r"config.adr.k_sweep=0"),
    ("fda.rank", 64, r"config.fda.rank=64 is invalid: larger than layer"),
    ("train.learning_rate", -1e-3, r"config.train.learning_rate=-0.001 is invalid"),
    ("fda.learning_rate", 0.0, r"config.fda.learning_rate=0.0 is invalid"),
    ("baselines.fta.learning_rates", (1e-2, -1.0), r"baselines.fta.learning_rates"),
    ("baselines.fta.ks", (5, 50), r"needs k <= data.support_size=10"),
    ("data.frames", 1, r"need at least 2 frames"),
    ("adr.selector", "median", r"known: \('herding'"),
    ("train.schedule", "linear", r"train.schedule='linear' is invalid: 'cosine'"),
    ("train.eval_every", -1, r"train.eval_every=-1 is invalid"),
])
def test_invalid_config_values_are_refused_before_any_work(smoke_config, tmp_path, key, value,
                                                           match):
  assert_refused_before_any_work(smoke_config, key, value, match, tmp_path)


def test_global_training_length_is_chosen_on_validation_and_resumes(smoke_config, bench,
                                                                   tmp_path):
  """train.eval_every > 0: the global model is scored on validation devices every that many
  steps, the best-scoring parameters are what the stage hands on, and a run killed after a
  checkpoint resumes to the same curve and the same parameters."""
  cfg = smoke_config.copy_and_resolve_references()
  cfg.train.eval_every = 2
  task = tasks.build(cfg)
  model = task.build_model()
  run = lambda w: train.train_global(task, model, cfg, bench, str(w),
                                     wd.MetricsWriter(str(w)))
  params, summary = run(tmp_path / "a")
  sel = task.selection_metric.name
  curve = summary["curve"]
  assert curve["step"] == [2, 4, 6] and summary["metric"] == sel
  assert summary["best_step"] == curve["step"][int(np.argmax(curve[sel]))]
  # the parameters handed on score the kept step's value on the validation devices
  feats = task.encode_split(model, params, bench.devices("validation"))
  feats = {k: v for k, v in feats.items() if k not in (task.support_role, task.oracle_role)}
  got = train.device_metrics(task, model, lambda net, dev: net)(params, feats)
  assert float(got[sel]) == pytest.approx(max(curve[sel]), abs=1e-6)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "global" / "6")
  again, summary_b = run(tmp_path / "b")
  assert summary_b["curve"] == curve
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               params, again)
