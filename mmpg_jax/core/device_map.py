"""Mapping a per-device function over many devices: a 1-D mesh of this host's accelerators,
each mapping its own share of a chunk (shard_map), on a CPU in vmapped sub-batches that stay
in cache. Used by edit generation and the streaming command (`mmpg_jax.generate`)."""
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as PS


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh ('data') over the given accelerators (default: this host's own)."""
  return Mesh(np.array(devices if devices is not None else jax.local_devices()), ("data",))


# Devices vmapped together inside an accelerator's share of a chunk, on a CPU: a sub-batch's
# working set stays in cache, where 1,024 devices vmapped at once stream each op's 10-100 MB
# through memory. On a 2-core CPU VM (bench: stream, generate) streaming (the simulated
# devices' uploads: contexts, element-landmark distances, herding, then the FDA) ran 1.37x
# faster with sub-batches of 64 and the LAPACK-free Nystrom herding together; the FDA alone
# was level (1.0-1.1x) in sub-batches of 256.
CPU_SUB_BATCH = {"stream": 64, "generate": 256}


def default_sub_batch(what: str, backend: str | None = None) -> int | None:
  """The sub-batch for `what` ('stream' or 'generate'): CPU_SUB_BATCH on a CPU; None (the
  whole share in one vmap) on accelerators, which want the widest batch."""
  return CPU_SUB_BATCH[what] if (backend or jax.default_backend()) == "cpu" else None


def map_devices(fn, xs, sub_batch: int | None):
  """fn over the leading (device) axis of xs: vmapped sub-batches of `sub_batch` in a loop
  (None, or at least the whole axis: one vmap)."""
  if sub_batch is None or sub_batch >= len(jax.tree.leaves(xs)[0]):
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=sub_batch)


def sharded_map(fn, mesh, sub_batch: int | None, *replicated):
  """xs (leading axis sharded over the mesh's 'data' axis) -> fn(*replicated, x) for each x:
  each accelerator maps its own share (`map_devices`), so sub-batches stay local."""
  def local(args, xs):
    return map_devices(lambda x: fn(*args, x), xs, sub_batch)
  return lambda xs: jax.shard_map(local, mesh=mesh, in_specs=(PS(), PS("data")),
                                  out_specs=PS("data"), check_vma=False)(replicated, xs)


def check_batch(device_batch: int, mesh) -> None:
  n = mesh.devices.size
  if device_batch <= 0 or device_batch % n:
    raise ValueError(f"device_batch={device_batch} must be a positive multiple of the {n} "
                     f"accelerators in the mesh (each takes device_batch / {n} devices)")
