"""cdc_robust's controls: does the FDA condition on the device? Each is chosen on validation
devices like cdc_mmpg, from the reference set of meta-training devices' edits."""
import jax
import jax.numpy as jnp

from mmpg_jax.adapt.cdc_robust.registry import Built, register
from mmpg_jax.core import params as P
from mmpg_jax.fda import reference as reference_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.ondevice import costs
from mmpg_jax.training.methods import grid

CONTROL = dict(role="control", select_on="validation")


def mean_applied_edit(edits, params, clip):
  """The mean over stacked edits of each leaf's applied (materialised, clipped) delta."""
  flat = P.flatten(params)
  out = {}
  for path, d in P.edit_leaves(edits).items():
    shape = flat[path].shape
    full = jax.vmap(lambda x: P.materialize(x, shape))(d)
    out[path] = jnp.clip(full, -clip, clip).mean(0)
  return P.unflatten(out)


@register("mean_edit", uses_upload=False, **CONTROL)
def mean_edit(env):
  """The mean of the reference devices' applied edits, the same for every device: no upload."""
  mean = mean_applied_edit(env.reference["edits"], env.params, env.clip)
  down = P.tree_size(mean) * env.dbytes
  merge = env.cm.merge(jax.eval_shape(lambda: mean))
  return Built(lambda params, dev, hp: P.apply_edit(params, mean),
               lambda hp: costs.DeviceCost(downlink_bytes=float(down), device_flops=merge))


@register("nearest_edit", **CONTROL)
def nearest_edit(env):
  """The edit of the reference device nearest to the upload in the FDA's code space: a lookup
  table over meta-training's devices."""
  def adapt(params, dev, hp):
    code = env.generated(params, dev)[1]["code"]
    i = reference_lib.code_distance(env.reference, code)[1]
    return P.apply_edit(params, jax.tree.map(lambda x: x[i], env.reference["edits"]), env.clip)
  return Built(adapt, env.base_cost)


@register("noisy_mean_edit", uses_upload=False, **CONTROL)
def noisy_mean_edit(env):
  """The mean edit plus Gaussian noise of the reference edits' own per-element spread (x
  `noise_scales`), drawn per device: does a generated edit beat a random perturbation of the
  training edits' mean at their scale? No upload."""
  applied, params, cfg = env.reference["applied"], env.params, env.cfg
  centre, spread = applied.mean(0), applied.std(0)
  paths = tuple(P.edit_leaves(jax.tree.map(lambda x: x[0], env.reference["edits"])))
  down = float(applied.shape[1] * env.dbytes)
  merge = env.cm.merge(jax.eval_shape(lambda: reference_lib.unflatten_applied(
      centre, params, paths)))

  def adapt(params, dev, hp):
    # the device's own key, folded apart from its random anchor selectors' stream
    key = jax.random.fold_in(round_trip.device_key(cfg.seed, dev), 17)
    vec = centre + hp["scale"] * spread * jax.random.normal(key, centre.shape)
    return P.apply_edit(params, reference_lib.unflatten_applied(vec, params, paths), env.clip)
  return Built(adapt, lambda hp: costs.DeviceCost(downlink_bytes=down, device_flops=merge),
               grid(scale=tuple(env.rc.noise_scales)))
