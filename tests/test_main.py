"""The entry point refuses bad input clearly, before any work."""
import os
import subprocess

import pytest
from conftest import ROOT, main_cmd, subprocess_env

from mmpg_jax import main, tasks
from mmpg_jax.core import checkpointing
from mmpg_jax.core import workdir as wd
from mmpg_jax.core.workdir import MetricsWriter
from mmpg_jax.training import train


def test_unknown_config_key_is_refused(tmp_path):
  r = subprocess.run(main_cmd(tmp_path / "w", "--config.train.nmu_steps=3"), cwd=ROOT,
                     env=subprocess_env(str(tmp_path)), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "nmu_steps" in r.stderr
  assert not (tmp_path / "w").exists()   # nothing was started


def test_dynamic_leaf_regex_matching_nothing_is_refused(smoke_config, tmp_path):
  cfg = smoke_config.copy_and_resolve_references()
  cfg.dynamic_leaves = ("answer_haed/.*",)
  with pytest.raises(ValueError, match="answer_haed.*matches no parameter leaf"):
    main.run(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_unwritable_workdir_is_refused(smoke_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(wd.WorkdirError, match="not a writable directory"):
    main.run(smoke_config, str(blocker / "run"))
  assert blocker.read_text() == "not a directory"


def _train(cfg, bench, workdir):
  task = tasks.build(cfg)
  model = task.build_model()
  return train.train_global(task, model, cfg, bench, str(workdir),
                            MetricsWriter(str(workdir)))[0]


def test_checkpoint_from_a_different_config_is_refused(smoke_config, bench, tmp_path):
  _train(smoke_config, bench, tmp_path)
  steps_before = sorted(os.listdir(tmp_path / "checkpoints" / "global"))
  cfg = smoke_config.copy_and_resolve_references()
  cfg.model.embed_dim = 24
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"different shapes(.|\n)*frame_encoder/proj/kernel(.|\n)*fresh --workdir"):
    _train(cfg, bench, tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints" / "global")) == steps_before


def test_non_finite_training_stops_with_the_step(smoke_config, bench, tmp_path):
  cfg = smoke_config.copy_and_resolve_references()
  cfg.train.learning_rate = 1e38
  cfg.train.warmup_steps = 1
  with pytest.raises(train.NonFiniteError, match=r"at step \d+; last good checkpoint"):
    _train(cfg, bench, tmp_path)


def test_negative_learning_rate_is_refused(smoke_config, bench, tmp_path):
  cfg = smoke_config.copy_and_resolve_references()
  cfg.train.learning_rate = -1e-3
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    _train(cfg, bench, tmp_path)
