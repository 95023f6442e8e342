"""The real entry point, end to end and tiny, plus the bad inputs it must refuse clearly."""
import json
import os
import subprocess
import sys

import pytest

from mmpg_jax import checkpointing, main, models, train
from mmpg_jax import workdir as wd
from mmpg_jax.data import moving_digits as md
from mmpg_jax.workdir import MetricsWriter

from conftest import ROOT

SMOKE = ["--config=configs/moving_digits_qa.py:smoke"]
# The smoke config runs one FTA budget and two ADR ablations (the default config runs them all).
METHODS = {"global", "fta_k5", "tent", "prior_em", "prior_em_asked", "oracle", "cdc_mmpg",
           "cdc_mmpg_random", "cdc_mmpg_all_frames"}


def _main_cmd(workdir, *extra):
  return [sys.executable, "-m", "mmpg_jax.main", *SMOKE, f"--workdir={workdir}", *extra]


def _env(data_dir):
  env = dict(os.environ, MMPG_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def test_smoke_run_of_the_real_entry_point(tmp_path, data_dir):
  workdir = tmp_path / "run"
  r = subprocess.run(_main_cmd(workdir), cwd=ROOT, env=_env(data_dir), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  for key in ("benchmark", "task", "num_eval_devices", "device_model_bytes", "methods"):
    assert key in res
  assert set(res["methods"]) == METHODS
  for name, m in res["methods"].items():
    for key in ("uplink_bytes", "downlink_bytes", "device_backward_passes", "device_flops",
                "labels_used_per_device"):
      assert key in m, (name, key)
    assert len(m["per_device"]["accuracy"]) == res["num_eval_devices"] == 3
    assert len(m["per_device"]["accuracy_ood"]) == 2
    assert 0.0 <= m["metrics"]["accuracy"] <= 1.0
  m = res["methods"]
  assert m["global"]["device_backward_passes"] == 0 and m["global"]["device_flops"] == 0
  assert m["fta_k5"]["labels_used_per_device"] == 5 and m["fta_k5"]["device_flops"] > 0
  assert m["prior_em"]["device_backward_passes"] == 0 and m["prior_em"]["labels_used_per_device"] == 0
  assert m["tent"]["labels_used_per_device"] == 0 and m["tent"]["device_backward_passes"] > 0
  for name in ("cdc_mmpg", "cdc_mmpg_random", "cdc_mmpg_all_frames"):
    c = m[name]
    assert c["device_backward_passes"] == 0 and c["labels_used_per_device"] == 0, name
    assert c["uplink_bytes"] > 0 and c["downlink_bytes"] > 0 and c["device_flops"] > 0
    assert "anchor_mmd2" in c["metrics"] and "anchor_mmd2_ood" in c["metrics"]
  assert m["cdc_mmpg_all_frames"]["uplink_bytes"] > m["cdc_mmpg"]["uplink_bytes"]
  assert res["fda"]["steps"] == 4
  report = (workdir / "report.md").read_text()
  assert "Oracle − global margin" in report and "| fta_k5 |" in report
  for f in ("config.json", "metrics.jsonl", "per_device_accuracy.png", "accuracy_vs_uplink.png"):
    assert (workdir / f).exists(), f
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(r["stage"] == "global" and "steps_per_s" in r for r in rows)


def test_unknown_config_key_is_refused(tmp_path):
  r = subprocess.run(_main_cmd(tmp_path / "w", "--config.train.nmu_steps=3"), cwd=ROOT,
                     env=_env(str(tmp_path)), capture_output=True, text=True, timeout=120)
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
  model = models.build(cfg.model, md.NUM_ANSWERS, len(md.VOCAB))
  return train.train_global(model, cfg, bench, str(workdir), MetricsWriter(str(workdir)))


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
