"""Timing parts of the benchmarks (`mmpg_jax.bench`): the best of repeated runs, XLA's FLOP
count of a compiled function, this backend's float32 matmul peak, and the FDA's pieces timed
apart (the `profile` of `bench --what=generate`)."""
import time

import jax
import jax.numpy as jnp

from mmpg_jax.core import device_map
from mmpg_jax.fda import model as fda_lib


def best_time(fn, repeats):
  jax.block_until_ready(fn())                      # compile / warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def xla_flops(jitted, *args) -> float:
  return float(jitted.lower(*args).compile().cost_analysis()["flops"])


def matmul_peak(repeats: int) -> dict:
  """Best float32 matmul throughput of this backend (n = 1024 and 2048), GFLOP/s."""
  out = {}
  for n in (1024, 2048):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    out[n] = 2 * n ** 3 / best_time(lambda: mm(a, a), repeats) / 1e9
  return {"matmul_gflops": max(out.values()),
          "matmul_gflops_by_size": {str(k): v for k, v in out.items()}}


def profile_pieces(fda, fda_params, uploads, repeats: int, sub_batch=None) -> dict:
  """The FDA's pieces (model.FDA's methods) each jitted and mapped over one chunk of uploads as
  generation maps them (`device_map.map_devices`, sub-batches of `sub_batch`), fed the previous
  pieces' outputs: seconds, XLA FLOPs, time share, FLOP share and achieved GFLOP/s of each,
  beside the whole chunk's fused generate."""
  v = {"params": fda_params}
  call = lambda method, *a: fda.apply(v, *a, method=method)
  run = lambda fn, sb=sub_batch: jax.jit(lambda *a: device_map.map_devices(lambda t: fn(*t), a, sb))
  primary = fda.modalities[0][0]
  summary = jax.vmap(lambda u: call(fda_lib.FDA.summary_of, u))(uploads)
  pieces = [("set_encoder", lambda u: call(fda_lib.FDA.encode, u), (uploads,))]
  pooled, h = run(pieces[0][1])(uploads)
  ratio = None
  if fda.label_groups:
    pieces.append(("em", lambda h, w: call(fda_lib.FDA.label_prior, h, w),
                   (h, uploads.weights[primary])))
    ratio = run(pieces[-1][1])(*pieces[-1][2])[1]
  pieces.append(("domain_code", lambda p, r, s: call(fda_lib.FDA.domain_code, p, r, s),
                 (pooled, ratio, summary)))
  z = run(pieces[-1][1])(*pieces[-1][2])
  pieces.append(("layer_recurrence", lambda z: call(fda_lib.FDA.layer_codes, z), (z,)))
  e = run(pieces[-1][1])(z)
  pieces.append(("heads", lambda e: call(fda_lib.FDA.heads, e), (e,)))
  outs = run(pieces[-1][1])(e)
  pieces.append(("assemble", lambda o, r, s: call(fda_lib.FDA.assemble, o, r, s),
                 (outs, ratio, summary)))
  rows = {}
  for name, fn, args in pieces:
    jitted = run(fn)
    rows[name] = {"seconds": best_time(lambda: jitted(*args), repeats),
                  "flops": xla_flops(run(fn, None), *args)}  # a loop's body counts once
  generate_one = lambda u: fda_lib.generate(fda, fda_params, u)
  whole = run(generate_one)
  t_whole = best_time(lambda: whole(uploads), repeats)
  t_sum = sum(r["seconds"] for r in rows.values())
  f_sum = sum(r["flops"] for r in rows.values())
  for r in rows.values():
    r.update(time_share=r["seconds"] / t_sum, flop_share=r["flops"] / max(f_sum, 1.0),
             achieved_gflops=r["flops"] / r["seconds"] / 1e9)
  return {"devices": len(jax.tree.leaves(uploads)[0]), "sub_batch": sub_batch, "pieces": rows,
          "sum_of_pieces_seconds": t_sum, "whole_chunk_seconds": t_whole,
          "whole_chunk_gflops": xla_flops(run(generate_one, None), uploads) / t_whole / 1e9}
