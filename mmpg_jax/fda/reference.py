"""The FDA's reference set: what meta-training's devices look like to a finished FDA.

The domain codes and edits of `fda.reference_devices` meta devices of the distribution the FDA
was meta-trained on: the yardstick of how far an evaluated device's upload lies from anything
meta-training saw (`code_distance`), and what the controls that ignore the upload (the mean
edit, the nearest meta device's edit) are made of.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax import adr, meta_train
from mmpg_jax.fda import round_trip


def reference_set(task, model, params, fda, fda_params, cfg, summary):
  """The FDA's domain codes and edits of `fda.reference_devices` meta devices of the
  distribution it was trained on (ids from 0, as meta-training drew them), with their typical
  spacing (median distance of a code to its nearest other code): the yardstick of how far an
  evaluated device's upload lies from anything meta-training saw, and what the controls (mean
  edit, nearest device's edit) are made of. {'codes' [R, C], 'edits' (stacked), 'spacing'}."""
  fc = cfg.fda
  ids = np.arange(min(fc.reference_devices, fc.meta_devices))
  pool = meta_train.encode_devices(task, model, params, ids, fc.meta_query_size,
                                   what="reference meta devices")
  consts = task.device_constants(model, params)

  @jax.jit
  def generate(pool_ctx, ids):
    def one(ctx, i):
      dev = {task.context_role: ctx, "device_id": i, **consts}
      edit, aux = round_trip.generated(task, params, fda, fda_params, cfg, summary, dev)
      return edit, aux["code"]
    return jax.vmap(one)(pool_ctx, ids)

  edits, ref = generate(pool[task.context_role], jnp.asarray(ids, jnp.int32))
  d = jnp.sqrt(jnp.maximum(adr._sq_dists(ref, ref), 0.0)) + jnp.eye(len(ids)) * 1e30
  spacing = jnp.median(d.min(1)) if len(ids) > 1 else jnp.float32(1.0)
  return {"codes": ref, "edits": edits, "spacing": spacing}


def code_distance(reference, code):
  """(distance of a code to the nearest reference code in units of their spacing, its index)."""
  d2 = jnp.sum(jnp.square(reference["codes"] - code), -1)
  i = jnp.argmin(d2)
  return jnp.sqrt(d2[i]) / reference["spacing"], i


def shared(ctx, fda, fda_params, summary):
  """The reference set of these FDA parameters, computed once per run (kept in `ctx.shared`)
  for every family that reads it (cdc_mmpg's diagnosis, cdc_robust's gate and controls)."""
  cached = ctx.shared.get("fda_reference")
  if cached is None or cached[0] is not fda_params:
    cached = (fda_params, reference_set(ctx.task, ctx.model, ctx.params, fda, fda_params,
                                        ctx.config, summary))
    ctx.shared["fda_reference"] = cached
  return cached[1]
