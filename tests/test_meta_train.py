"""FDA meta-training: resume after a kill, selection on validation devices only."""
import os
import shutil

import jax
import numpy as np
import pytest

from mmpg_jax.adapt import cdc_robust
from mmpg_jax.adapt.cdc_robust import router
from mmpg_jax.core.workdir import MetricsWriter
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.training import meta_train


@pytest.fixture(scope="module")
def setup(smoke_config, task, bench, model_and_params):
  model, params = model_and_params
  prior = np.full(14, 1 / 14, np.float32)
  fda = fda_lib.from_config(smoke_config, task, params, prior, task.anchor_dims(model, params))
  val = task.encode_split(model, params, bench.devices("validation"))
  summary = round_trip.device_summary(task, model, smoke_config, prior)
  return task, model, params, fda, val, summary


def _run(cfg, setup, workdir):
  task, model, params, fda, val, summary = setup
  return fda_stage.train_fda(task, model, fda, params, cfg, val, str(workdir),
                              MetricsWriter(str(workdir)), summary)


def test_meta_training_resumes_and_matches_an_uninterrupted_run(smoke_config, setup, tmp_path):
  cfg = smoke_config.copy_and_resolve_references()
  full, summary = _run(cfg, setup, tmp_path / "a")
  assert summary["steps"] == cfg.fda.num_steps
  # A run "killed" after its step-2 checkpoint: drop the later checkpoint and rerun.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  ck = tmp_path / "b" / "checkpoints" / "fda"
  steps = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
  assert steps == [2, 4]
  shutil.rmtree(ck / "4")
  resumed, _ = _run(cfg, setup, tmp_path / "b")
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               full, resumed)


def test_meta_training_changes_the_fda_and_keeps_the_zero_edit_candidate(smoke_config, setup,
                                                                         tmp_path):
  cfg = smoke_config.copy_and_resolve_references()
  cfg.fda.learning_rate = 1e-2
  _, model, params, fda, val, _ = setup
  best, summary = _run(cfg, setup, tmp_path)
  # selection: the returned params are those of the best validation score (step 0 included)
  assert 0 <= summary["best_step"] <= cfg.fda.num_steps
  assert 0.0 <= summary["best_val_accuracy"] <= 1.0
  rows = [l for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"fda"' in l]
  assert any('"val_accuracy"' in r and '"step": 0' in r for r in rows)
  # the meta step really trains: gradients flow into the FDA from the task loss
  import json
  logged = [json.loads(r) for r in rows if '"grad_norm"' in r]
  assert logged and all(r["grad_norm"] > 0 and np.isfinite(r["task_loss"]) for r in logged)
  fresh = fda_lib.init(fda, jax.random.key(cfg.seed + 1))
  assert jax.tree.structure(fresh) == jax.tree.structure(best)


def test_the_router_trains_on_meta_devices_neither_expert_saw(smoke_config, setup, tmp_path,
                                                               monkeypatch):
  task, model, params, fda, val, summary = setup
  cfg = smoke_config.copy_and_resolve_references()
  cfg.cdc_robust.router.learning_rate = 1e-1
  leaves, tdef = jax.tree.flatten(fda_lib.init(fda, jax.random.key(0)))
  experts = tuple(jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape)
                                            for x, k in zip(leaves, jax.random.split(
                                                jax.random.key(s), len(leaves)))])
                  for s in (1, 2))
  seen = []
  real = meta_train.encode_devices
  monkeypatch.setattr(meta_train, "encode_devices",
                      lambda t, m, p, ids, *a, **k: seen.append(list(ids)) or real(
                          t, m, p, ids, *a, **k))
  r, rp, out = router.train(task.with_data(cdc_robust.mix_overrides(cfg)), model, fda, experts,
                            params, cfg, val, str(tmp_path), MetricsWriter(str(tmp_path)),
                            summary)
  assert seen == [list(range(cfg.fda.meta_devices,
                             cfg.fda.meta_devices + cfg.cdc_robust.router.meta_devices))]
  assert out["steps"] == cfg.cdc_robust.router.num_steps and 0 <= out["best_step"] <= 4
  import json
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
          if '"router"' in l and '"grad_norm"' in l]
  assert rows and all(x["grad_norm"] > 0 and np.isfinite(x["task_loss"]) for x in rows)


def test_a_selected_stage_records_its_validation_curve_and_resumes_it(smoke_config, setup,
                                                                       tmp_path):
  """The curve (step 0, every eval_every, the last) travels in the checkpoints: a stage resumed
  after a kill reports the same curve, and the kept step is the curve's best."""
  cfg = smoke_config.copy_and_resolve_references()
  _, summary = _run(cfg, setup, tmp_path / "a")
  curve = summary["curve"]
  every = cfg.fda.eval_every
  assert curve["step"] == list(range(0, cfg.fda.num_steps + 1, every))
  scores = curve["accuracy"]
  assert summary["best_step"] == curve["step"][int(np.argmax(scores))]
  assert summary["best_val_accuracy"] == pytest.approx(max(scores), abs=1e-6)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "fda" / str(cfg.fda.num_steps))
  _, again = _run(cfg, setup, tmp_path / "b")
  assert again["curve"] == curve
