"""The FDA's reference set: what meta-training's devices look like to a finished FDA.

The domain codes and edits of `fda.reference_devices` meta devices of the distribution the FDA
was meta-trained on: the yardstick of how far an evaluated device's upload lies from anything
meta-training saw (`code_distance`), and what the controls that ignore the upload (the mean
edit, the nearest meta device's edit) are made of.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.core import params as P
from mmpg_jax.fda import round_trip
from mmpg_jax.ondevice import adr
from mmpg_jax.training import meta_train


def applied_vector(edit, params, clip):
  """One edit as the change it makes: every edited leaf materialised and clipped, flattened
  and concatenated (leaf paths in sorted order) -> [D]. Edits of different ranks or factor
  signs that make the same change give the same vector."""
  flat = P.flatten(params)
  leaves = P.edit_leaves(edit)
  return jnp.concatenate([jnp.clip(P.materialize(leaves[p], flat[p].shape), -clip, clip).ravel()
                          for p in sorted(leaves)])


def unflatten_applied(vec, params, paths):
  """The inverse of applied_vector for the leaves `paths`: {path: full delta} as an edit."""
  flat = P.flatten(params)
  out, i = {}, 0
  for p in sorted(paths):
    n = int(np.prod(flat[p].shape))
    out[p] = vec[i:i + n].reshape(flat[p].shape)
    i += n
  return P.unflatten(out)


def nearest_spacing(x):
  """Median distance of each row of x [R, D] to its nearest other row (1.0 for one row)."""
  if len(x) < 2:
    return jnp.float32(1.0)
  d = jnp.sqrt(jnp.maximum(adr._sq_dists(x, x), 0.0)) + jnp.eye(len(x)) * 1e30
  return jnp.median(d.min(1))


def reference_set(task, model, params, fda, fda_params, cfg, summary, workdir=None):
  """The FDA's domain codes and edits of `fda.reference_devices` meta devices of the
  distribution it was trained on (ids from 0, as meta-training drew them), with their typical
  spacing (median distance of a code to its nearest other code): the yardstick of how far an
  evaluated device's upload lies from anything meta-training saw, and what the controls (mean
  edit, nearest device's edit) are made of. {'codes' [R, C], 'edits' (stacked), 'spacing'}.
  With a `workdir` the devices are read from the run's stored pool (the FDA's: its first R)."""
  fc = cfg.fda
  ids = np.arange(min(fc.reference_devices, fc.meta_devices))
  pool = meta_train.encode_devices(task, model, params, ids, fc.meta_query_size,
                                   what="reference meta devices", workdir=workdir)
  consts = task.device_constants(model, params)

  @jax.jit
  def generate(pool_ctx, ids):
    def one(ctx, i):
      dev = {task.context_role: ctx, "device_id": i, **consts}
      edit, aux = round_trip.generated(task, params, fda, fda_params, cfg, summary, dev)
      return edit, aux["code"]
    return jax.vmap(one)(pool_ctx, ids)

  edits, ref = generate(pool[task.context_role], jnp.asarray(ids, jnp.int32))
  # The edits as the changes they make (applied: materialised, clipped): the yardstick of
  # memorisation (how near a generated edit lies to a training device's) and of the noisy
  # mean-edit control's scale.
  applied = jax.jit(jax.vmap(lambda e: applied_vector(e, params, fc.clip)))(edits)
  return {"codes": ref, "edits": edits, "spacing": nearest_spacing(ref),
          "applied": applied, "edit_spacing": nearest_spacing(applied),
          "edit_spread": jnp.sqrt(jnp.mean(jnp.sum(jnp.square(
              applied - applied.mean(0)), -1)))}


def edit_distance(reference, vec):
  """(distance of an applied edit vector to the nearest reference device's, in units of the
  reference edits' own nearest-neighbour spacing; the same distance over their spread, the
  RMS distance of a reference edit to their mean)."""
  d = jnp.sqrt(jnp.maximum(jnp.min(jnp.sum(jnp.square(reference["applied"] - vec), -1)), 0.0))
  tiny = 1e-12        # identical training edits (a fresh FDA's zeros): no yardstick
  return (d / jnp.maximum(reference["edit_spacing"], tiny),
          d / jnp.maximum(reference["edit_spread"], tiny))


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
                                        ctx.config, summary, ctx.workdir))
    ctx.shared["fda_reference"] = cached
  return cached[1]
