"""The real entry point, end to end and tiny: what a run writes, and that a run interrupted by
SIGTERM and SIGKILL (several times, at random points) ends exactly like an uninterrupted one."""
import json
import random
import signal
import subprocess
import time

import jax
import numpy as np
from conftest import LONG, ROOT
from conftest import checkpoint_steps as _steps
from conftest import main_cmd, subprocess_env

from mmpg_jax import tasks
from mmpg_jax.core import checkpointing
from mmpg_jax.training import train

# The smoke config runs one FTA budget and two ADR ablations (the default config runs them all).
METHODS = {"global", "fta_k5", "tent", "prior_em", "prior_em_asked", "oracle", "global_meta",
           "cdc_mmpg", "cdc_mmpg_random", "cdc_mmpg_all_frames", "t3a", "lame", "foa",
           "cdc_mmpg_em2", "cdc_mmpg_gate", "cdc_mmpg_cloud_tent", "cdc_mmpg_wide",
           "cdc_mmpg_routed", "cdc_mmpg_ensemble", "cdc_mmpg_mean_edit",
           "cdc_mmpg_noisy_mean_edit", "cdc_mmpg_nearest_edit", "cdc_mmpg_on_global_meta"}


def _cmd(workdir, *extra):
  return main_cmd(workdir, *LONG, *extra)


def _final_global_params(workdir, cfg):
  task = tasks.build(cfg)
  model = task.build_model()
  _, target = train.initial_state(task, model, cfg)
  with checkpointing.StageCheckpointer(str(workdir), "global") as ck:
    state, _ = ck.restore(target)
  return state


def test_smoke_run_of_the_real_entry_point(clean_run):
  workdir = clean_run
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
  # The run ends by printing the headline table: one row per method, the header's columns.
  table = [l for l in (workdir / "stdout.txt").read_text().splitlines() if l.startswith("|")]
  assert table[0].startswith("| method | accuracy test | closed | accuracy OOD |")
  assert {l.split("|")[1].strip() for l in table[2:]} == METHODS
  assert all(l.count("|") == table[0].count("|") for l in table)
  for key in ("edit_norm", "code_distance", "fda_prior_tv", "shift_tv",    # the diagnosis
              "edit_nn_distance"):
    assert len(m["cdc_mmpg"]["per_device"][key + "_ood"]) == 2, key
  # Variants, controls and forward-only rivals: no label, no device backward pass; only the
  # cloud-side refinement and the two-expert rows (a second FDA) may cost cloud FLOPs.
  for name in METHODS - {"global", "fta_k5", "tent", "prior_em", "prior_em_asked", "oracle"}:
    assert m[name]["device_backward_passes"] == 0 and m[name]["labels_used_per_device"] == 0
    assert m[name]["cloud_flops"] == 0 or name in (
        "cdc_mmpg_cloud_tent", "cdc_mmpg_routed", "cdc_mmpg_ensemble"), name
  assert m["foa"]["device_flops"] > m["lame"]["device_flops"] > 0
  # the cloud's backpropagation through uploaded samples has its own column
  ct = m["cdc_mmpg_cloud_tent"]
  cfg_json = json.loads((workdir / "config.json").read_text())
  assert ct["cloud_backward_passes"] == (cfg_json["cdc_robust"]["cloud_samples"]
                                         * ct["selected_hparams"]["steps"])
  assert all(m[n]["cloud_backward_passes"] == 0 for n in METHODS - {"cdc_mmpg_cloud_tent"})
  # the data-matched control: trained on meta devices, nothing on the device
  g = m["global_meta"]
  assert g["device_flops"] == 0 and g["uplink_bytes"] == 0 and g["downlink_bytes"] > 0
  assert g["seen"]["meta_devices"] == res["global_meta"]["meta_devices"] > 0
  # ... and the FDA meta-trained to edit it, a row of its own (0 labels, 0 backward passes)
  assert "fda_on_global_meta" in res and m["cdc_mmpg_on_global_meta"]["uplink_bytes"] > 0
  # the robustness variants are chosen on the validation OOD devices, reported beside test
  assert res["num_val_ood_devices"] == 2 and "accuracy_val_ood" in m["cdc_mmpg"]["metrics"]
  assert m["cdc_mmpg_em2"]["selected_on"] == "val_ood"
  assert m["cdc_mmpg_mean_edit"]["selected_on"] == m["cdc_mmpg"]["selected_on"] == "validation"
  assert res["ood_choice"]["row"] in res["ood_choice"]["candidates"]
  # every row against the references, with intervals, in results.json and report.md
  assert set(res["differences"]) >= {"global", "global_meta", "fta_k5", "best_rival"}
  mean, lo, hi = res["differences"]["global"]["cdc_mmpg"]["test"]
  assert lo <= mean <= hi
  assert "fda_wide" in res and "Beyond the training shifts" in (workdir / "report.md").read_text()
  assert res["fda"]["steps"] == 24
  report = (workdir / "report.md").read_text()
  assert "Oracle − global margin" in report and "| fta_k5 |" in report
  assert "## Diagnosis: cdc_mmpg on devices near and far from meta-training" in report
  assert "## Differences with paired 95% intervals" in report and "## What each row saw" in report
  for f in ("config.json", "metrics.jsonl", "per_device_accuracy.png", "accuracy_vs_uplink.png",
            "gain_vs_code_distance.png"):
    assert (workdir / f).exists(), f
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(r["stage"] == "global" and "steps_per_s" in r for r in rows)
  # the accuracy-cost frontier over every method, with each method's peak device memory
  # (the resident model + the largest working set; inference's is every method's floor)
  assert m["global"]["device_peak_bytes"] > res["device_model_bytes"]
  assert all(r["device_peak_bytes"] >= m["global"]["device_peak_bytes"] for r in m.values())
  fro = res["frontier"]
  assert set(fro) == {"device_flops", "bytes_per_request", "device_peak_bytes", "reference"}
  assert fro.pop("reference")["test"] == m["oracle"]["metrics"]["accuracy"]
  for axis in fro.values():
    assert set(axis) == {"test", "test_ood"}
    assert {p["method"] for p in axis["test"]} == METHODS - {"oracle"}
    assert any(p["pareto"] for p in axis["test"])
  # deployment: the configured encodings of cdc_mmpg's traffic, on a float and an int8 model
  tr = res["deployment"]["traffic"]["cdc_mmpg"]
  assert [(r["encoding"], r["int8_model"]) for r in tr["rows"]] == [
      ("float32", False), ("int8", False), ("float32", True), ("int8", True)]
  f32, i8 = tr["rows"][0], tr["rows"][1]
  assert f32["bytes"] == m["cdc_mmpg"]["uplink_bytes"] + m["cdc_mmpg"]["downlink_bytes"]
  assert i8["bytes"] < f32["bytes"] / 3 and tr["selected"] in ("float32", "int8")
  assert set(res["deployment"]["rollback"]["cdc_mmpg"]["groups"]) == {
      "validation", "test", "test_ood", "val_ood"}
  for section in ("## Accuracy–cost frontier", "## Compressed traffic", "## Label-free rollback"):
    assert section in report, section
  assert (workdir / "frontier.png").exists()
  # where the time went: every top-level stage, a family's meta-training stages nested
  table = report[report.index("## Where the time went"):].splitlines()
  names = {l.split("|")[1].replace("&nbsp;", "").strip() for l in table if l.startswith("| ")}
  assert {"data", "global_training", "family_cdc_mmpg", "fda", "evaluation"} <= names
  done = [r for r in rows if r["stage"] == "done"][-1]
  assert done["wall_seconds"] >= done["family_cdc_mmpg_seconds"] > 0
  # the FDA's meta devices: encoded once (global_meta's queries), read by both FDAs and the
  # reference set, stored in the workdir
  assert len(list((workdir / "meta_pools").glob("*.npz"))) >= 1
  log = (workdir / "stderr.txt").read_text()
  assert log.count("read from the stored pool") >= 3


def test_sigterm_and_repeated_sigkill_end_exactly_like_an_uninterrupted_run(
    smoke_config, data_dir, tmp_path, clean_run):
  clean, killed = clean_run, tmp_path / "killed"

  rng = random.Random(0)
  # (each run is a fresh process: two kills in a stage and one in the next cover a resume
  # that is itself killed; more kills of the same stage only add process start-ups)
  plan = [("global", signal.SIGTERM), ("global", signal.SIGKILL), ("global", signal.SIGKILL),
          ("fda", signal.SIGKILL)]
  for stage, sig in plan:
    ckpt = killed / "checkpoints" / stage
    seen = _steps(ckpt)
    p = subprocess.Popen(_cmd(killed), cwd=ROOT, env=subprocess_env(data_dir),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and (not _steps(ckpt) or _steps(ckpt)[-1] <= max(seen or [0])):
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))          # land at a random point between checkpoints
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGTERM:                  # a final checkpoint, then exit 143
      assert p.returncode == 143, err[-2000:]
      assert "preempted (SIGTERM); saved step" in err
      saved = int(err.split("saved step ")[1].split()[0])
      assert saved in _steps(ckpt)
    else:
      assert p.returncode == -signal.SIGKILL
    if stage == "global":
      assert _steps(ckpt)[-1] < 60, "training finished before the kill"
  assert _steps(killed / "checkpoints" / "fda")[-1] < 24, "meta-training ended before the kill"
  r = subprocess.run(_cmd(killed), cwd=ROOT, env=subprocess_env(data_dir), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming from checkpoint step" in r.stderr

  cfg = smoke_config.copy_and_resolve_references()
  cfg.train.num_steps = 60
  a, b = _final_global_params(clean, cfg), _final_global_params(killed, cfg)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  # Same seed -> the same results.json, bit for bit.
  assert (clean / "results.json").read_bytes() == (killed / "results.json").read_bytes()


