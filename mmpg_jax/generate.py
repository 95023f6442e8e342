r"""Cloud-side edit generation for many devices: jit(vmap(generate)), streamed and sharded.

  python -m mmpg_jax.generate --config=configs/<experiment>.py --workdir=RUN --num_devices=N \
      [--out=DIR] [--device_batch=1024] [--pool_devices=1024] [--evaluate] [--distributed]

restores the hypernetwork (FDA) and the device model of a finished run (`RUN`, written by
`python -m mmpg_jax.main` with the same config; another config is refused), then streams N
simulated devices (`simulate.py`) through one jitted function per chunk of `device_batch`
devices: on the accelerator each device makes its upload with the device-side code the
evaluation runs (`fda.round_trip.device_upload`: ADR anchors + its forward-only summary), and
the FDA turns it into the edit. The chunk's device axis is sharded with NamedSharding over a
Mesh of every local accelerator (`core/device_map.py`: each maps its own share, on a CPU in
vmapped sub-batches that stay in cache); the next chunk is dispatched before the previous one is
fetched, and shards are written by a background thread, so host and accelerator work overlap.
Edits go to numpy shards with a JSON index (`edit_shards.py`), or with `--evaluate` only
per-shard sums of the devices' query metric with and without their edit. Memory is flat in N.
A rerun skips the shards already written (a killed run resumes by chunk and ends with the same
bytes). With `--distributed` (multi-host TPU), `jax.distributed.initialize()` connects the
hosts and host p of P takes shards p, p+P, ...

Uploads that arrive from real devices are checked at the boundary (`upload.validate_upload`):
a bad upload is refused with a message, never turned into a silently wrong edit. An upload is
what `fda.round_trip.device_upload` makes (an `upload.Upload`). `EditGenerator` maps uploads
(a leading device axis) to edits, in fixed-size sharded chunks.
"""
import collections
import concurrent.futures
import hashlib
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS
from ml_collections import config_flags

from mmpg_jax.core import checkpointing, edit_shards
from mmpg_jax.core import params as P
from mmpg_jax.core import preemption
from mmpg_jax.core import workdir as workdir_lib
from mmpg_jax.core.device_map import check_batch, default_sub_batch, make_mesh, sharded_map
from mmpg_jax.core.upload import UploadError, validate_upload
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.training import runs, simulate


class EditGenerator:
  """Edits for uploads that arrived from devices: `gen(uploads) -> edits`, uploads an upload
  pytree whose leaves have a leading device axis N; every edit leaf gets the same axis.
  `chunks(uploads)` yields them chunk by chunk (memory flat in N); `gen(uploads)` concatenates."""

  def __init__(self, fda, fda_params, device_batch: int = 256, mesh=None,
               max_anchors: int | None = None, sub_batch="auto"):
    self.fda, self.fda_params = fda, fda_params
    self.mesh = mesh or make_mesh()
    check_batch(device_batch, self.mesh)
    self.device_batch, self.max_anchors = device_batch, max_anchors
    self.sub_batch = default_sub_batch("generate") if sub_batch == "auto" else sub_batch
    self.sharding = NamedSharding(self.mesh, PS("data"))
    self._params = jax.device_put(fda_params, NamedSharding(self.mesh, PS()))
    gen = lambda p, u: fda_lib.generate(fda, p, u)
    self.fn = jax.jit(lambda p, u: sharded_map(gen, self.mesh, self.sub_batch, p)(u),
                      out_shardings=self.sharding)

  def validate(self, uploads):
    n = len(jax.tree.leaves(uploads)[0])
    spec = self.fda.upload_spec()
    checked = [validate_upload(jax.tree.map(lambda x: x[i], uploads), spec, self.max_anchors)
               for i in range(n)]
    for m in spec["anchors"]:
      ks = {c.anchors[m].shape[0] for c in checked}
      if len(ks) != 1:
        raise UploadError(f"a batch must share one anchor budget K per modality; got {m} K in "
                          f"{sorted(ks)}. Group uploads by K.")
    return jax.tree.map(lambda *xs: np.stack(xs), *checked)

  def chunk(self, uploads_chunk):
    """One full chunk [device_batch, ...] of uploads -> its edits, on the accelerators (async)."""
    return self.fn(self._params, jax.device_put(uploads_chunk, self.sharding))

  def chunks(self, uploads, validate: bool = True):
    if validate:
      uploads = self.validate(uploads)
    n, b = len(jax.tree.leaves(uploads)[0]), self.device_batch
    for s in range(0, n, b):
      part = jax.tree.map(lambda x: np.asarray(x)[s:s + b], uploads)
      pad = b - len(jax.tree.leaves(part)[0])
      if pad:                                   # fixed shapes: one compile for every chunk
        part = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)]), part)
      yield s, jax.tree.map(lambda x: np.asarray(x)[:b - pad], self.chunk(part))

  def __call__(self, uploads, validate: bool = True):
    return jax.tree.map(lambda *xs: np.concatenate(xs),
                        *[e for _, e in self.chunks(uploads, validate)])


# ---------- streaming many simulated devices ---------------------------------------------------

class Streamer:
  """One jitted, sharded function from a chunk of device indices to their edits (flat rows in
  the comm dtype) or, with `evaluate`, their query metric with and without the edit. Compiles
  once (`traces` counts it)."""

  def __init__(self, task, model, config, params, fda, fda_params, summary, pool, *,
               device_batch: int, evaluate: bool = False, mesh=None, sub_batch="auto"):
    self.mesh = mesh or make_mesh()
    check_batch(device_batch, self.mesh)
    self.device_batch, self.evaluate, self.traces = device_batch, evaluate, 0
    self.sub_batch = default_sub_batch("stream") if sub_batch == "auto" else sub_batch
    self.sharding = NamedSharding(self.mesh, PS("data"))
    replicated = NamedSharding(self.mesh, PS())
    self.dtype = jnp.dtype(config.comm_dtype)
    constants = task.device_constants(model, params)
    ac = config.adr

    def one(base, fp, pool, n):
      dev = simulate.device(task, pool, n, config.seed, constants)
      upload = round_trip.device_upload(task, base, dev, selector=ac.selector, k=ac.k,
                                        key=round_trip.device_key(config.seed, dev),
                                        summary=summary)
      edit = fda_lib.generate(fda, fp, upload)
      if not evaluate:
        return edit_shards.flatten(edit, self.dtype)
      query = dev[task.query_role]
      adapted = P.apply_edit(base, edit, config.fda.clip)
      return {"global": task.meta_loss(model, base, query)[1],
              "cdc_mmpg": task.meta_loss(model, adapted, query)[1]}

    def chunk_fn(base, fp, pool, ids):
      self.traces += 1                          # runs at trace time only
      return sharded_map(one, self.mesh, self.sub_batch, base, fp, pool)(ids)

    self._fn = jax.jit(chunk_fn, out_shardings=self.sharding)
    self._args = jax.device_put((params, fda_params, pool), replicated)
    self.edit_shape = fda_lib.edit_shape(fda, fda_params, ac.k)

  def __call__(self, start: int, stop: int):
    """Devices [start, stop) (stop - start <= device_batch), dispatched asynchronously."""
    ids = np.arange(start, start + self.device_batch, dtype=np.int32)
    ids[stop - start:] = stop - 1                        # a short last chunk: same shape
    return self._fn(*self._args, jax.device_put(ids, self.sharding))


def _summarise(values: dict) -> dict:
  """Per-shard sums of the query metric with/without the edit (aggregated later)."""
  g, e = (np.asarray(values[k], np.float64) for k in ("global", "cdc_mmpg"))
  return {"devices": int(len(g)), "sum": {"global": float(g.sum()), "cdc_mmpg": float(e.sum())},
          "sum_sq": {"global": float((g * g).sum()), "cdc_mmpg": float((e * e).sum())},
          "gain_sum": float((e - g).sum()), "gain_sum_sq": float(((e - g) ** 2).sum()),
          "improved": int((e > g).sum())}


def aggregate(parts: list) -> dict:
  n = sum(p["devices"] for p in parts)
  out = {"devices": n}
  for m in ("global", "cdc_mmpg"):
    mean = sum(p["sum"][m] for p in parts) / n
    out[m] = {"mean": mean, "std": float(np.sqrt(max(sum(p["sum_sq"][m] for p in parts) / n
                                                     - mean * mean, 0.0)))}
  gain = sum(p["gain_sum"] for p in parts) / n
  out["gain"] = {"mean": gain, "std": float(np.sqrt(max(
      sum(p["gain_sum_sq"] for p in parts) / n - gain * gain, 0.0)))}
  out["share_improved"] = sum(p["improved"] for p in parts) / n
  return out


def run_index(config, fda, fda_params, num_devices, device_batch, pool_devices,
              evaluate) -> dict:
  """What identifies a generation run: a rerun must match it to resume into the same OUT."""
  cfg_json = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
  index = {"format": edit_shards.FORMAT, "num_devices": num_devices,
           "devices_per_shard": device_batch, "pool_devices": pool_devices,
           "mode": "metrics" if evaluate else "edits",
           "config_sha256": hashlib.sha256(cfg_json.encode()).hexdigest(),
           "fda_sha256": checkpointing.state_checksum(fda_params), "seed": config.seed,
           "simulated_devices": simulate.__doc__.split("\n\n")[1].split("\n")[0]}
  if not evaluate:
    shape = fda_lib.edit_shape(fda, fda_params, config.adr.k)
    index.update(dtype=jnp.dtype(config.comm_dtype).name, leaves=edit_shards.leaf_table(shape),
                 row_floats=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shape)))
  return index


def _kind(streamer) -> str:
  return "metrics" if streamer.evaluate else "edits"


def _shards_to_write(streamer, out, num_devices: int, index: dict, pid: int, nproc: int):
  """This host's shards (pid, pid + nproc, ...) and those of them not yet complete in OUT."""
  per = streamer.device_batch
  total = edit_shards.num_shards(num_devices, per)

  def done(k):
    path = edit_shards.shard_path(out, _kind(streamer), k, total)
    if streamer.evaluate:
      return path.exists()
    rows = len(edit_shards.shard_range(k, per, num_devices))
    return edit_shards.shard_complete(path, rows, index["row_floats"], streamer.dtype)

  mine = list(range(pid, total, nproc))
  todo = [k for k in mine if not done(k)]
  logging.info("generate: %d devices in %d shards of %d; host %d/%d has %d shards, %d already "
               "written, %d to go", num_devices, total, per, pid, nproc, len(mine),
               len(mine) - len(todo), len(todo))
  return mine, todo


def _write_result(writer, writes, streamer, out, num_devices: int, k: int, result) -> int:
  """Fetches shard k's result (waiting for its chunk only) and queues its write on `writer`;
  at most 2 writes stay in flight, so memory is flat in N. Returns the shard's devices."""
  per = streamer.device_batch
  total = edit_shards.num_shards(num_devices, per)
  rows = len(edit_shards.shard_range(k, per, num_devices))
  host = jax.tree.map(lambda x: np.asarray(x)[:rows], result)
  path = edit_shards.shard_path(out, _kind(streamer), k, total)
  if streamer.evaluate:
    writes.append(writer.submit(edit_shards.write_json, path, _summarise(host)))
  else:
    writes.append(writer.submit(edit_shards.write_shard, path, host))
  while len(writes) > 2:
    writes.popleft().result()
  return rows


def _stream_shards(streamer, out, num_devices: int, todo: list, t0: float,
                   log_every_s: float) -> int:
  """Dispatches each shard's chunk, then fetches and writes the previous one while the
  accelerator computes it; stops after a preemption request. Returns the devices written."""
  per = streamer.device_batch
  n_todo = sum(len(edit_shards.shard_range(k, per, num_devices)) for k in todo)
  writes, last, written = collections.deque(), time.time(), 0
  with concurrent.futures.ThreadPoolExecutor(1) as writer:
    pending = None
    for k in todo:
      r = edit_shards.shard_range(k, per, num_devices)
      result = streamer(r.start, r.stop)        # dispatched: the accelerator starts on it now
      if pending is not None:
        written += _write_result(writer, writes, streamer, out, num_devices, *pending)
      pending = (k, result)
      if preemption.requested():
        break
      if time.time() - last > log_every_s:
        rate = written / max(time.time() - t0, 1e-9)
        logging.info("generate: %d/%d devices | %.0f devices/s, ETA %.0fs", written, n_todo,
                     rate, (n_todo - written) / max(rate, 1e-9))
        last = time.time()
    if pending is not None:
      written += _write_result(writer, writes, streamer, out, num_devices, *pending)
    for w in writes:
      w.result()
  return written


def stream(streamer, out, num_devices: int, index: dict, *, process=(0, 1),
           log_every_s: float = 10.0) -> dict:
  """Streams this host's shards into OUT (skipping finished ones); returns this host's stats."""
  mine, todo = _shards_to_write(streamer, out, num_devices, index, *process)
  t0 = time.time()
  written = _stream_shards(streamer, out, num_devices, todo, t0, log_every_s)
  if preemption.requested():
    raise preemption.Preempted(f"generate: preempted (SIGTERM) after {written} devices; "
                               f"finished shards are in {out}; rerun the same command to "
                               f"resume")
  seconds = time.time() - t0
  return {"devices": written, "shards_written": len(todo), "shards_skipped": len(mine) - len(todo),
          "seconds": seconds, "devices_per_s": written / max(seconds, 1e-9),
          "compiles": streamer.traces}


def finalize(out, num_devices: int, index: dict, evaluate: bool) -> dict:
  """done.json once every shard is there (host 0, after every host's stream)."""
  per = index["devices_per_shard"]
  total = edit_shards.num_shards(num_devices, per)
  kind = "metrics" if evaluate else "edits"
  missing = [k for k in range(total) if not edit_shards.shard_path(out, kind, k, total).exists()]
  if missing:
    raise runs.RunNotFinishedError(f"{len(missing)} of {total} shards are missing in {out} (e.g. "
                              f"{missing[:5]}); rerun the same command to write them.")
  done = {"num_devices": num_devices, "num_shards": total, "mode": kind}
  if evaluate:
    parts = [json.loads(edit_shards.shard_path(out, kind, k, total).read_text())
             for k in range(total)]
    done["query_metric"] = aggregate(parts)
  edit_shards.write_json(os.path.join(out, "done.json"), done)
  return done


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(config, workdir, num_devices, out=None, device_batch=1024, pool_devices=1024,
        evaluate=False) -> dict:
  """The whole command; returns its summary (also printed as one JSON line)."""
  if num_devices is None or num_devices <= 0:
    raise ValueError(f"--num_devices={num_devices}: give the number of devices to generate "
                     f"edits for, a positive integer.")
  if pool_devices <= 0:
    raise ValueError(f"--pool_devices={pool_devices} must be positive.")
  t_start = time.time()
  task, model, params, fda, fda_params, summary = fda_stage.restore(config, workdir)
  out = out or os.path.join(os.path.abspath(workdir), "generated",
                            f"{'metrics' if evaluate else 'edits'}_n{num_devices}")
  mesh = make_mesh()
  check_batch(device_batch, mesh)
  index = run_index(config, fda, fda_params, num_devices, device_batch, pool_devices, evaluate)
  if jax.process_index() == 0:
    edit_shards.open_output(out, index)            # a different run's OUT fails here, early
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mmpg_jax.generate: index written")
    edit_shards.open_output(out, index)              # every host checks it is the same run
  t = time.time()
  pool = simulate.build_pool(task, model, params, config.fda, pool_devices, workdir=workdir)
  t_pool = time.time() - t
  streamer = Streamer(task, model, config, params, fda, fda_params, summary, pool,
                      device_batch=device_batch, evaluate=evaluate, mesh=mesh)
  stats = stream(streamer, out, num_devices, index,
                 process=(jax.process_index(), jax.process_count()))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mmpg_jax.generate: every shard written")
  done = finalize(out, num_devices, index, evaluate) if jax.process_index() == 0 else {}
  summary_row = {"out": str(out), "num_devices": num_devices, "device_batch": device_batch,
                 "accelerators": mesh.devices.size, "backend": jax.default_backend(),
                 "process": jax.process_index(), "pool_seconds": t_pool, **stats,
                 "wall_seconds": time.time() - t_start, "peak_rss_mb": peak_rss_mb(),
                 **({"query_metric": done["query_metric"]} if "query_metric" in done else {})}
  logging.info("generate: %d devices in %.1fs (%.0f devices/s streaming); peak RSS %.0f MB; %s",
               stats["devices"], stats["seconds"], stats["devices_per_s"],
               summary_row["peak_rss_mb"], out)
  return summary_row


def _define_flags():
  """The command's flags (defined only when run as a command: tests import this module beside
  mmpg_jax.main, which has its own --config)."""
  config_flags.DEFINE_config_file("config", None, "the run's config (and overrides)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "a finished run's workdir (python -m mmpg_jax.main)")
  flags.DEFINE_integer("num_devices", None, "simulated devices to generate edits for")
  flags.DEFINE_string("out", None, "output directory (default: "
                      "WORKDIR/generated/<edits|metrics>_n<N>)")
  flags.DEFINE_integer("device_batch", 1024, "devices per compiled chunk and per shard (a "
                       "multiple of the local accelerators)")
  flags.DEFINE_integer("pool_devices", 1024, "real devices rendered once; simulated devices "
                       "resample their contexts (see simulate.py)")
  flags.DEFINE_bool("evaluate", False, "keep only aggregated query metrics (with and without "
                    "the edit) instead of writing the edits")
  flags.DEFINE_bool("distributed", bool(os.environ.get("MMPG_DISTRIBUTED")),
                    "multi-host: jax.distributed.initialize() first (on TPU it finds the pod "
                    "by itself; elsewhere give the three flags below)")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed)")
  flags.DEFINE_integer("num_processes", None, "number of processes (--distributed)")
  flags.DEFINE_integer("process_id", None, "this process's index (--distributed)")
  flags.mark_flags_as_required(["config", "workdir", "num_devices"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  workdir_lib.quiet_library_logs()
  preemption.install()
  if f.distributed:                # on a TPU pod JAX's runtime finds the coordinator itself
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  row = run(f.config, f.workdir, f.num_devices, f.out, f.device_batch, f.pool_devices,
            f.evaluate)
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
