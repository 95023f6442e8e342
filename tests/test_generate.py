"""Streamed, sharded generation for many simulated devices (`python -m mmpg_jax.generate`):
the same edits on 1 and 8 accelerators and as the evaluated cdc_mmpg method, one compile while
streaming, resume by chunk after a kill with identical shards, and bad input refused."""
import json
import socket
import subprocess

import jax
import numpy as np
import pytest
from conftest import LONG, ROOT, main_cmd, subprocess_env

from mmpg_jax import generate
from mmpg_jax.core import edit_shards
from mmpg_jax.core import params as P
from mmpg_jax.core import preemption
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.training import runs, simulate

N = 21            # devices: chunk sizes 8 and 16 do not divide it
POOL = 3


def _config(smoke_config, *extra):
  """The smoke config with the overrides the clean run was made with (+ extra)."""
  cfg = smoke_config.copy_and_resolve_references()
  for arg in LONG + list(extra):
    key, value = arg.removeprefix("--config.").split("=")
    section, name = key.split(".")
    cfg[section][name] = type(cfg[section][name])(value)
  return cfg


@pytest.fixture(scope="module")
def restored(smoke_config, clean_run, data_dir):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MMPG_DATA_DIR", data_dir)
    cfg = _config(smoke_config)
    run = fda_stage.restore(cfg, str(clean_run))
  task, model, params, _, _, _ = run
  pool = simulate.build_pool(task, model, params, cfg.fda, POOL)
  return cfg, run, pool


def _stream(restored, out, device_batch, mesh, evaluate=False):
  cfg, (task, model, params, fda, fp, summary), pool = restored
  streamer = generate.Streamer(task, model, cfg, params, fda, fp, summary, pool,
                               device_batch=device_batch, evaluate=evaluate, mesh=mesh)
  index = generate.run_index(cfg, fda, fp, N, device_batch, POOL, evaluate)
  edit_shards.open_output(out, index)
  return streamer, generate.stream(streamer, out, N, index)


def test_edits_are_the_same_on_1_and_8_accelerators_and_are_the_evaluated_methods(
    restored, tmp_path):
  cfg, (task, model, params, fda, fp, summary), pool = restored
  one, stats1 = _stream(restored, tmp_path / "one", 8, generate.make_mesh(jax.devices()[:1]))
  eight, stats8 = _stream(restored, tmp_path / "eight", 16, generate.make_mesh(jax.devices()))
  assert len(jax.devices()) == 8 and eight.mesh.devices.size == 8
  assert stats1["compiles"] == stats8["compiles"] == 1      # 3 and 2 chunks, one compile each
  a = edit_shards.read(tmp_path / "one", range(N))
  b = edit_shards.read(tmp_path / "eight", range(N))
  assert a.shape == (N, json.loads((tmp_path / "one" / "index.json").read_text())["row_floats"])
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.abs(a).max() > 0 and not np.allclose(a[0], a[POOL])   # resampled contexts differ
  # The evaluated method (cdc_mmpg.adapt_device) on the same simulated devices.
  consts = task.device_constants(model, params)
  dev_fn = jax.jit(lambda pool, n: simulate.device(task, pool, n, cfg.seed, consts))
  for n in (0, 7, N - 1):
    dev = dev_fn(pool, np.int32(n))
    evaluated = round_trip.adapt_device(task, params, fda, fp, dev, selector=cfg.adr.selector,
                                      k=cfg.adr.k, clip=cfg.fda.clip,
                                      key=round_trip.device_key(cfg.seed, dev), summary=summary)
    streamed = P.apply_edit(params, edit_shards.unflatten(a[n], one.edit_shape), cfg.fda.clip)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 streamed, evaluated)


def test_a_killed_generation_resumes_by_chunk_and_ends_with_the_same_bytes(
    restored, tmp_path, monkeypatch):
  mesh = generate.make_mesh(jax.devices()[:2])
  _stream(restored, tmp_path / "clean", 4, mesh)
  killed = tmp_path / "killed"
  checks = []                         # SIGTERM arrives while the second chunk is computing
  with monkeypatch.context() as mp:
    mp.setattr(preemption, "requested", lambda: checks.append(1) or len(checks) >= 2)
    with pytest.raises(preemption.Preempted, match="rerun the same command to resume"):
      _stream(restored, killed, 4, mesh)
  written = sorted(p.name for p in killed.glob("edits-*.npy"))
  assert len(written) == 2                                  # the chunks finished before SIGTERM
  # A SIGKILL during a write leaves a temporary file and no shard; a truncated shard is redone.
  (killed / ".edits-00003-of-00006.npy.tmp").write_bytes(b"partial")
  (killed / written[1]).write_bytes((killed / written[1]).read_bytes()[:100])
  _, stats = _stream(restored, killed, 4, mesh)
  assert stats["shards_skipped"] == 1 and stats["shards_written"] == 5
  for p in sorted((tmp_path / "clean").glob("edits-*.npy")):
    assert (killed / p.name).read_bytes() == p.read_bytes(), p.name


def test_evaluate_keeps_only_aggregated_query_metrics(restored, tmp_path):
  cfg, (task, model, params, fda, fp, summary), pool = restored
  out = tmp_path / "metrics"
  _stream(restored, out, 8, generate.make_mesh(jax.devices()[:1]), evaluate=True)
  assert not list(out.glob("edits-*"))
  index = json.loads((out / "index.json").read_text())
  done = generate.finalize(str(out), N, index, evaluate=True)
  q = done["query_metric"]
  assert q["devices"] == N and 0 <= q["global"]["mean"] <= 1
  # The global model's mean query metric over the same simulated devices, directly.
  consts = task.device_constants(model, params)
  direct = jax.jit(jax.vmap(lambda pool, n: task.meta_loss(model, params, simulate.device(
      task, pool, n, cfg.seed, consts)[task.query_role])[1], in_axes=(None, 0)))(
          pool, np.arange(N, dtype=np.int32))
  np.testing.assert_allclose(q["global"]["mean"], float(direct.mean()), rtol=1e-5)
  np.testing.assert_allclose(q["gain"]["mean"], q["cdc_mmpg"]["mean"] - q["global"]["mean"],
                             atol=1e-6)


def test_the_generate_command_end_to_end(clean_run, data_dir, tmp_path):
  out = tmp_path / "cmd"
  cmd = main_cmd(clean_run, *LONG, "--num_devices=10", "--device_batch=4", "--pool_devices=2",
                 f"--out={out}", module="mmpg_jax.generate")
  r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(data_dir), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  row = json.loads(r.stdout.strip().splitlines()[-1])
  assert row["devices"] == 10 and row["compiles"] == 1 and row["peak_rss_mb"] > 0
  assert json.loads((out / "done.json").read_text())["num_shards"] == 3
  assert "devices/s" in r.stderr                            # the progress line
  # Another N is another run: refused before any work (resuming is tested in-process above).
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  r = subprocess.run([c if not c.startswith("--num_devices") else "--num_devices=12"
                      for c in cmd], cwd=ROOT, env=subprocess_env(data_dir),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "already holds the shards of a different run" in r.stderr
  assert "num_devices" in r.stderr
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before        # nothing overwritten
  # Two processes (jax.distributed on localhost, one CPU each) share the shards of one OUT and
  # end with the bytes the single process wrote.
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  two = tmp_path / "two"
  procs = [subprocess.Popen(
      [c.replace(f"--out={out}", f"--out={two}") for c in cmd] +
      ["--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=subprocess_env(data_dir), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (o, e) in zip(procs, results):
    assert p.returncode == 0, e[-3000:]
    assert "read from the stored pool" in e      # the first command stored it in the run's workdir
  rows = [json.loads(o.strip().splitlines()[-1]) for o, _ in results]
  assert sorted(r["shards_written"] for r in rows) == [1, 2]               # shards 0, 2 | 1
  for name, data in before.items():
    assert (two / name).read_bytes() == data, name


def test_bad_runs_and_counts_are_refused(smoke_config, clean_run, tmp_path, data_dir,
                                         monkeypatch):
  monkeypatch.setenv("MMPG_DATA_DIR", data_dir)
  cfg = _config(smoke_config)
  with pytest.raises(ValueError, match="--num_devices=0: give the number of devices"):
    generate.run(cfg, str(clean_run), 0)
  other = _config(smoke_config, "--config.fda.hidden=24")
  with pytest.raises(runs.RunMismatchError, match=r"fda.hidden: run 16 vs now 24"):
    generate.run(other, str(clean_run), 10)
  with pytest.raises(runs.RunMismatchError, match="has no config.json"):
    generate.run(cfg, str(tmp_path), 10)
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "config.json").write_text((clean_run / "config.json").read_text())
  with pytest.raises(runs.RunNotFinishedError, match="has not finished its 'global' stage"):
    generate.run(cfg, str(unfinished), 10)
  assert not (unfinished / "checkpoints").exists()          # nothing created in it
  stranger = tmp_path / "stranger"
  stranger.mkdir()
  (stranger / "notes.txt").write_text("mine")
  with pytest.raises(edit_shards.OutputMismatchError, match="not a generation output"):
    edit_shards.open_output(stranger, {"format": edit_shards.FORMAT})
  assert (stranger / "notes.txt").read_text() == "mine"


def test_the_benchmarks_print_json_lines_with_their_figures(clean_run, data_dir):
  cmd = main_cmd(clean_run, *LONG, "--what=generate,device_adaptation", "--num_devices=16",
                 "--device_batch=8", "--repeats=1", module="mmpg_jax.bench")
  cmd = [c.replace("--workdir=", "--run_dir=") for c in cmd]
  r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(data_dir), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
  gen = [x for x in rows if x["benchmark"] == "generate"]
  assert len(gen) == 1 and gen[0]["num_devices"] == 16 and gen[0]["flops_per_device"] > 0
  assert gen[0]["devices_per_s"]["batched_sharded"] > 0 and gen[0]["matmul_gflops"] > 0
  adapt = [x for x in rows if x["benchmark"] == "device_adaptation"]
  assert {x["method"] for x in adapt} == {"cdc_mmpg", "cdc_mmpg_random", "cdc_mmpg_all_frames"}
  for x in adapt:
    assert x["device_backward_passes"] == 0 and x["fta_k5"]["device_backward_passes"] > 0
    assert x["device_flops"] > x["device_flops_without_encoding"] > 0
    assert x["uplink_bytes"] > 0 and x["downlink_bytes"] > 0 and x["seconds_per_device"] > 0
