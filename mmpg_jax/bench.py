r"""Benchmarks: figures and ratios measured side by side in one run, one JSON object per line.

  python -m mmpg_jax.bench [--what=generate,stream,device_adaptation,meta_pool,main_job,adr]
      [--config=configs/moving_digits_qa.py] [--run_dir=<a finished run of that config>]

  generate           cloud edit generation (the FDA forward) for N = --num_devices (default
                     1,000 / 10,000 / 100,000) devices: a per-device Python loop of a jitted
                     generate vs the EditGenerator (jit of the vmapped generate, in sub-batches
                     on a CPU: device_map.CPU_SUB_BATCH) streamed in chunks of --device_batch,
                     sharded over every local accelerator, results fetched to the host as the
                     command does. flops_per_device (XLA cost analysis of one jitted generate;
                     _batched: of the vmapped one, per device), devices/s of both and their
                     ratio, achieved GFLOP/s beside the float32 matmul peak measured in the same
                     run, and their ratio (share_of_matmul_peak; _batched_flops: counting the
                     batched FLOPs). FDA parameters random (timings do not depend on them).
                     The last row's `profile`: one chunk through each of the FDA's pieces (set
                     encoder, EM, domain code, layer recurrence, heads, assembling the edit),
                     jitted apart, mapped as generation maps them: time share, FLOP share and
                     achieved GFLOP/s of each.
  stream             the streaming command itself (`python -m mmpg_jax.generate`, a subprocess
                     per N, writing edit shards to a temporary directory) on --run_dir: devices/s
                     including the device-side uploads it simulates, and peak_rss_mb at each N.
  device_adaptation  device-side FLOPs (XLA) and seconds per device of each hypernetwork
                     method's device path (anchor selection + summary, then merging the edit)
                     against fta_k5, with bytes up and down; on the validation devices of the
                     config's data, with --run_dir's trained model and FDA when given.
  meta_pool          the FDA's meta-device pool (render, encode, herding order, summary) of
                     --pool_devices fresh devices, with the config's selector and exact herding:
                     devices/s (the default QA job's slowest single stage on a CPU).
  main_job           `python -m mmpg_jax.main` with this --config into a fresh workdir; its
                     stage times (data, global training, method families incl. meta-training,
                     evaluation) from the run's metrics.jsonl.
  adr                on-device anchor selection: ms per device and MMD of each selector.

Set XLA_FLAGS=--xla_force_host_platform_device_count=8 to see the sharded path spread over 8
simulated CPU devices (they share the same cores: not faster).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mmpg_jax import generate, tasks
from mmpg_jax.bench_timing import best_time, matmul_peak, profile_pieces, xla_flops
from mmpg_jax.adapt import baselines, cdc_mmpg
from mmpg_jax.core import params as P
from mmpg_jax.core import workdir
from mmpg_jax.core.upload import Upload
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.ondevice import adr, costs
from mmpg_jax.training.methods import MethodContext

BENCHMARKS = ("generate", "stream", "device_adaptation", "meta_pool", "main_job", "adr")
DEFAULT_CONFIG = "configs/moving_digits_qa.py"
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "experiment config",
                                          lock_config=True)
_WHAT = flags.DEFINE_list("what", ["generate", "device_adaptation"],
                          f"benchmarks to run, in order; any of {BENCHMARKS}")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "a finished run of --config (for stream; "
                               "device_adaptation uses its trained model if given)")
_N = flags.DEFINE_list("num_devices", ["1000", "10000", "100000"], "device counts")
_BATCH = flags.DEFINE_integer("device_batch", 1024, "devices per compiled chunk")
_K = flags.DEFINE_integer("k", 16, "anchors per device")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats (best is reported)")
_POOL = flags.DEFINE_integer("pool_devices", 1024, "meta devices the meta_pool benchmark encodes")


def _random_fda(cfg):
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, 0)
  prior = None
  if task.label_groups:
    a = max(hi for _, hi in task.label_groups)
    prior = np.full(a, 1.0 / a)
  fda = fda_lib.from_config(cfg, task, params, prior, task.anchor_dims(model, params))
  fp = fda_lib.init(fda, jax.random.key(0))
  fp = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), fp)
  return task, model, params, fda, fp


def _uploads(fda, n, k, seed):
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  anchors = {m: np.asarray(jax.random.normal(next(keys), (n, k, d)), np.float32)
             for m, d in fda.modalities}
  weights = {m: np.full((n, k), 1.0 / k, np.float32) for m, _ in fda.modalities}
  summary = (np.asarray(0.1 * jax.random.normal(next(keys), (n, fda.summary_dim)), np.float32)
             if fda.summary_dim else None)
  return Upload(anchors, weights, summary)


def _stream_chunks(gen, banks, n):
  """n devices through gen in chunks, as the command streams them: chunk i+1 is dispatched
  before chunk i is fetched to the host. Upload chunks cycle through a few host banks."""
  b = gen.device_batch
  pending = None
  for i in range(-(-n // b)):
    out = gen.chunk(banks[i % len(banks)])
    if pending is not None:
      jax.tree.map(np.asarray, pending)
    pending = out
  jax.tree.map(np.asarray, pending)


def bench_generate(cfg, peak):
  _, _, _, fda, fp = _random_fda(cfg)
  k, b = _K.value, _BATCH.value
  one = jax.jit(lambda p, u: fda_lib.generate(fda, p, u))
  single = jax.tree.map(lambda x: x[0], _uploads(fda, 1, k, 2))
  flops = xla_flops(one, fp, single)
  gen = generate.EditGenerator(fda, fp, b)
  banks = [_uploads(fda, b, k, 10 + i) for i in range(4)]
  vmapped = jax.jit(jax.vmap(lambda p, u: fda_lib.generate(fda, p, u), in_axes=(None, 0)))
  flops_batched = xla_flops(vmapped, fp, banks[0]) / b     # (a sub-batch loop counts once)
  loop_bank = _uploads(fda, 256, k, 3)
  per_device = [jax.tree.map(lambda x: x[i], loop_bank) for i in range(256)]
  jax.block_until_ready(one(fp, per_device[0]))
  _stream_chunks(gen, banks, b)                      # compile
  rows = []
  for n in (int(x) for x in _N.value):
    t = time.perf_counter()
    for i in range(n):
      out = one(fp, per_device[i % 256])
    jax.block_until_ready(out)
    t_loop = time.perf_counter() - t
    t_batch = min(_timed(lambda: _stream_chunks(gen, banks, n)) for _ in range(_REPEATS.value))
    rate = n / t_batch
    rows.append({
        "benchmark": "generate", "task": cfg.task, "num_devices": n, "k": k,
        "modalities": [m for m, _ in fda.modalities], "device_batch": b,
        "sub_batch": gen.sub_batch,
        "accelerators": gen.mesh.devices.size, "backend": jax.default_backend(),
        "flops_per_device": flops, "flops_per_device_batched": flops_batched,
        "devices_per_s": {"loop": n / t_loop, "batched_sharded": rate},
        "speedup_batched_over_loop": t_loop / t_batch,
        "achieved_gflops": rate * flops / 1e9, **peak,
        "share_of_matmul_peak": rate * flops / 1e9 / peak["matmul_gflops"],
        "share_of_matmul_peak_batched_flops": rate * flops_batched / 1e9 / peak["matmul_gflops"]})
  rows[-1]["profile"] = profile_pieces(fda, fp, banks[0], _REPEATS.value, gen.sub_batch)
  return rows


def _timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _config_args():
  """This command's --config flags (file and overrides), for the subprocesses it starts."""
  args = [a for a in sys.argv[1:] if a.startswith("--config")]
  if not any(a.startswith("--config=") for a in args):
    args.insert(0, f"--config={DEFAULT_CONFIG}")
  return args


def bench_stream(cfg):
  if not _RUN_DIR.value:
    raise app.UsageError("the stream benchmark runs `python -m mmpg_jax.generate` on a finished "
                         "run: pass --run_dir=<workdir of python -m mmpg_jax.main with the same "
                         "--config>")
  rows = []
  for n in (int(x) for x in _N.value):
    with tempfile.TemporaryDirectory() as out:
      cmd = [sys.executable, "-m", "mmpg_jax.generate", *_config_args(),
             f"--workdir={_RUN_DIR.value}", f"--num_devices={n}",
             f"--device_batch={_BATCH.value}", f"--out={out}/edits"]
      r = subprocess.run(cmd, capture_output=True, text=True)
      if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
      row = json.loads(r.stdout.strip().splitlines()[-1])
    rows.append({"benchmark": "stream", "task": cfg.task, "num_devices": n,
                 **{k: row[k] for k in ("device_batch", "accelerators", "backend",
                                        "devices_per_s", "seconds", "pool_seconds",
                                        "wall_seconds", "peak_rss_mb", "compiles")}})
  base = rows[0]["peak_rss_mb"]
  for r in rows:
    r["peak_rss_vs_smallest_n"] = r["peak_rss_mb"] / base
  return rows


def _trained_or_random(cfg):
  """(task, model, params, fda, fda params, summary fn, source prior, data, selected hps)."""
  task = tasks.build(cfg)
  model = task.build_model()
  data = task.prepare_data()
  prior = task.source_prior(data)
  if _RUN_DIR.value:
    task, model, params, fda, fp, summary = fda_stage.restore(cfg, _RUN_DIR.value)
    with open(os.path.join(_RUN_DIR.value, "results.json")) as f:
      hps = {n: m["selected_hparams"] for n, m in json.load(f)["methods"].items()}
  else:
    params = task.init_params(model, cfg.seed)
    fda, summary = round_trip.fda_and_summary(task, model, params, cfg, prior)
    fp, hps = fda_lib.init(fda, jax.random.key(0)), {}
  return task, model, params, fda, fp, summary, prior, data, hps


def bench_device_adaptation(cfg):
  task, model, params, fda, fp, summary, prior, data, hps = _trained_or_random(cfg)
  val = task.encode_split(model, params, data.devices("validation"))
  n_dev = len(val["device_id"])
  cm = costs.CostModel(task, model, params)
  ctx = MethodContext(task=task, model=model, params=params, cost_model=cm, config=cfg,
                      source_prior=prior, val=val, workdir=None, metrics=None)
  fta = next(m for m in baselines.build(ctx) if m.name == "fta_k5")
  hp = hps.get("fta_k5", fta.grid[0])
  ctx_sub = {k: v for k, v in val.items() if k in fta.uses or k not in task.roles}
  t_fta = best_time(lambda: jax.jit(jax.vmap(lambda d: fta.adapt(params, d, hp)))(ctx_sub),
                     _REPEATS.value)
  c = fta.cost(hp)
  n_fta = c.labels_used_per_device
  ref = {"method": "fta_k5", "hp": hp, "device_flops": c.device_flops,
         "device_flops_without_encoding": c.device_flops - cm.encode(n_fta),
         "seconds_per_device": t_fta / n_dev, "device_backward_passes": c.device_backward_passes,
         "uplink_bytes": c.uplink_bytes, "downlink_bytes": c.downlink_bytes}
  rows = []
  ac = cfg.adr
  for m in cdc_mmpg.make_methods(ctx, fda, fp, summary):
    sel, k = m.info["selector"], m.info["k"]
    sub = {kk: v for kk, v in val.items() if kk in m.uses or kk not in task.roles}
    upload = jax.jit(jax.vmap(lambda d, sel=sel, k=k: round_trip.device_upload(
        task, params, d, selector=sel, k=k, key=round_trip.device_key(cfg.seed, d),
        summary=summary)))
    edits = jax.jit(jax.vmap(lambda u: fda_lib.generate(fda, fp, u)))(upload(sub))   # cloud
    merge = jax.jit(jax.vmap(lambda e: P.apply_edit(params, e, cfg.fda.clip)))
    t_up = best_time(lambda: upload(sub), _REPEATS.value)
    t_merge = best_time(lambda: merge(edits), _REPEATS.value)
    c = m.cost({})
    without = c.device_flops - cm.encode(cfg.data.context_size)
    rows.append({"benchmark": "device_adaptation", "task": cfg.task, "method": m.name,
                 "selector": sel, "k": k, "devices": n_dev, "device_flops": c.device_flops,
                 "device_flops_without_encoding": without,
                 "seconds_per_device": (t_up + t_merge) / n_dev,
                 "seconds_per_device_upload": t_up / n_dev,
                 "seconds_per_device_merge": t_merge / n_dev,
                 "device_backward_passes": c.device_backward_passes,
                 "uplink_bytes": c.uplink_bytes, "downlink_bytes": c.downlink_bytes,
                 "fta_k5": ref,
                 "flops_ratio_fta_k5_over_method": ref["device_flops"] / c.device_flops,
                 "flops_ratio_without_encoding": ref["device_flops_without_encoding"] / without,
                 "seconds_ratio_fta_k5_over_method": ref["seconds_per_device"]
                 / ((t_up + t_merge) / n_dev),
                 "default_method": sel == ac.selector and k == ac.k})
  return rows


def bench_meta_pool(cfg):
  """The FDA's meta-device pool: render, encode, herding order and summary of --pool_devices
  fresh meta devices (fda.stage.encode_meta_pool), with the config's selector and with exact
  herding; devices/s of each."""
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, cfg.seed)
  prior = task.source_prior(task.prepare_data())
  summary = round_trip.device_summary(task, model, cfg, prior)
  fc = cfg.fda.copy_and_resolve_references()
  with fc.unlocked():
    fc.meta_devices = _POOL.value
  out = {"benchmark": "meta_pool", "task": cfg.task, "devices": _POOL.value,
         "backend": jax.default_backend(), "devices_per_s": {}}
  warm = fc.copy_and_resolve_references()
  with warm.unlocked():
    warm.meta_devices = min(64, _POOL.value)      # one chunk: the same compiled shapes
  for sel in dict.fromkeys((cfg.adr.selector, "herding")):
    fda_stage.encode_meta_pool(task, model, params, warm, summary=summary, selector=sel)
    t = time.perf_counter()
    fda_stage.encode_meta_pool(task, model, params, fc, summary=summary, selector=sel)
    out["devices_per_s"][sel] = _POOL.value / (time.perf_counter() - t)
  return [out]


def bench_main_job(cfg):
  workdir = tempfile.mkdtemp(prefix="mmpg_bench_main_")
  cmd = [sys.executable, "-m", "mmpg_jax.main", *_config_args(), f"--workdir={workdir}"]
  t = time.time()
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  wall = time.time() - t
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    done = [json.loads(line) for line in f if '"stage": "done"' in line][-1]
  stages = {k.removesuffix("_seconds"): v for k, v in done.items() if k.endswith("_seconds")}
  return [{"benchmark": "main_job", "task": cfg.task, "workdir": workdir,
           "command_seconds": wall, "stage_seconds": stages,
           "backend": jax.default_backend()}]


def bench_adr(cfg):
  """ADR on the primary modality's elements of random contexts (64 devices)."""
  task, model, params, _, _ = _random_fda(cfg)
  ctx = task.example_features(model, params, cfg.data.context_size)
  ctx = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), (64,) + x.shape)
                     if x.dtype.kind == "f" else jnp.broadcast_to(x, (64,) + x.shape), ctx)
  mod = next(iter(task.anchor_dims(model, params)))
  el = jax.vmap(lambda c: task.anchor_elements(c)[mod])(ctx)
  out = {"benchmark": "adr", "task": cfg.task, "modality": mod, "k": _K.value,
         "elements": int(el.shape[1]), "devices": 64, "ms_per_device": {}, "mmd2": {}}
  for sel in adr.SELECTORS:
    fn = jax.jit(jax.vmap(lambda c: adr.select(task.anchor_elements(c)[mod], _K.value, sel,
                                               jax.random.key(0))))
    out["ms_per_device"][sel] = 1e3 * best_time(lambda: fn(ctx), _REPEATS.value) / 64
    a, wt = fn(ctx)
    out["mmd2"][sel] = float(jnp.mean(jax.vmap(adr.mmd2)(a, wt, el)))
  out["herding_vs_random_mmd_ratio"] = out["mmd2"]["herding"] / out["mmd2"]["random"]
  sq = jax.vmap(lambda e: adr._sq_dists(e, e)[np.triu_indices(e.shape[0], k=1)])(el)
  out["median_ms_per_device"] = {
      "sort (jnp.median)": 1e3 * best_time(lambda: jax.jit(jax.vmap(jnp.median))(sq), 3) / 64,
      "counting (adr.median_nonneg)": 1e3 * best_time(
          lambda: jax.jit(jax.vmap(adr.median_nonneg))(sq), 3) / 64}
  return [out]


def main_(argv):
  del argv
  workdir.quiet_library_logs()
  cfg = _CONFIG.value
  unknown = [w for w in _WHAT.value if w not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f"--what: unknown benchmarks {unknown}; known: {BENCHMARKS}")
  peak = matmul_peak(_REPEATS.value) if "generate" in _WHAT.value else None
  for what in _WHAT.value:
    fn = {"generate": lambda: bench_generate(cfg, peak), "stream": lambda: bench_stream(cfg),
          "device_adaptation": lambda: bench_device_adaptation(cfg),
          "meta_pool": lambda: bench_meta_pool(cfg), "main_job": lambda: bench_main_job(cfg),
          "adr": lambda: bench_adr(cfg)}[what]
    for row in fn():
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main_)
