"""CDC-MMPG beyond its training shifts: variants and controls, as rows `cdc_mmpg_<name>`.

Every variant starts from the plain cdc_mmpg round trip (ADR anchors + summary up, FDA edit
down) and keeps its promise: no backward pass and no label on the device. Each has a grid that
contains the plain method (scale 0, no gate, zero steps), so selection on validation devices
can fall back to it. `config.cdc_robust.variants` picks the rows.

Variants
  em2         a second forward round on the device: it merges the edit, asks every label
              group of its context once more with the *edited* model and re-estimates the
              remaining label shift by EM, applied as `scale` x log-ratio on the label bias
              (closed form, on the device; nothing more crosses the network). Label-group tasks.
  gate        an uncertainty rule in the cloud: the edit is scaled by
              exp(-max(0, d - 1) / tau), d the upload's domain-code distance to the nearest
              meta-training device in units of their typical spacing (tau = 0: no gate).
  cloud_tent  cloud-side refinement: the device also uploads the encoded features of its first
              `cloud_samples` context samples; the cloud takes `steps` Adam steps of the task's
              unsupervised objective (entropy) on `cloud_leaves`, starting from the edited
              model, and ships the edit plus the refined leaves. The gradient steps are the
              cloud's (reported as cloud FLOPs per device); the device only merges.
  wide        the same FDA meta-trained (stage `fda_wide`) over a wider shift distribution,
              `wide_data` (config.data overrides: unions of intervals beyond the training
              ranges), refused if it would draw a value only the OOD group shows
              (task.check_meta_data); the device side is plain cdc_mmpg's.
  wide_mix    the same over a mixture (stage `fda_wide_mix`): a share `wide_mix_fraction` of
              the meta devices draws from `wide_data`'s ranges, the rest from the training
              ones, so meta-training still sees in-distribution devices as often as those.
Controls (does the FDA condition on the device?)
  mean_edit     the mean of the reference meta devices' applied (clipped) edits, the same for
                every device: no upload.
  nearest_edit  the edit of the reference meta device nearest to the upload in the FDA's code
                space: a lookup table over meta-training's devices.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax import config_checks, costs
from mmpg_jax import params as P
from mmpg_jax.adapt import cdc_mmpg, device
from mmpg_jax.adapt.baselines import Method, grid

VARIANTS = ("em2", "gate", "cloud_tent", "wide", "wide_mix", "mean_edit", "nearest_edit")


def wide_overrides(cfg) -> dict:
  """{variant: config.data overrides} of the variants that meta-train their own FDA."""
  rc, out = cfg.cdc_robust, {}
  if "wide" in rc.variants:
    out["wide"] = rc.wide_data.to_dict()
  if "wide_mix" in rc.variants:
    out["wide_mix"] = {"meta_wide": {"fraction": float(rc.wide_mix_fraction),
                                     "shift": rc.wide_data.to_dict().get("shift", {})}}
  return out


def scale_edit(edit, g):
  """g x the edit (a low-rank delta scales its left factor)."""
  def one(d):
    return P.LowRankDelta(d.a * g, d.b) if isinstance(d, P.LowRankDelta) else d * g
  return jax.tree.map(one, edit, is_leaf=lambda x: isinstance(x, P.LowRankDelta))


def mean_applied_edit(edits, params, clip):
  """The mean over stacked edits of each leaf's applied (materialised, clipped) delta."""
  flat = P.flatten(params)
  out = {}
  for path, d in P.edit_leaves(edits).items():
    shape = flat[path].shape
    full = jax.vmap(lambda x: P.materialize(x, shape))(d)
    out[path] = jnp.clip(full, -clip, clip).mean(0)
  return P.unflatten(out)


def sample_bytes(task, model, params, dbytes):
  """Bytes of one encoded sample's features (what `cloud_tent` uploads per sample)."""
  f = jax.eval_shape(lambda p: task.encode(model, p, *task.example_inputs(1)), params)
  return sum(int(np.prod(v.shape)) for v in f.values()) * dbytes


def cloud_samples_upload(task, dev, m: int):
  """cloud_tent's extra upload: the encoded features of the first m context samples."""
  return jax.tree.map(lambda x: x[:m], dev[task.context_role])


def cloud_refine(loss_fn, edited, leaves, feats, hp):
  """In the cloud: `hp['steps']` Adam steps of the unsupervised objective on the uploaded
  samples, from the edited model (the cloud holds the device model and the edit it made).
  Zero steps return the edited model itself. The device merges the result, nothing more."""
  return device.finetune(loss_fn, edited, leaves, feats, optimizer="adam", lr=hp["lr"],
                         steps=hp["steps"])


def validate_config(cfg, task) -> None:
  rc, need = cfg.cdc_robust, config_checks.need
  for v in rc.variants:
    need(v in VARIANTS, "cdc_robust.variants", rc.variants, f"known: {VARIANTS}")
  for key in ("cdc_robust.reference_devices", "cdc_robust.cloud_samples",
              "cdc_robust.cloud_learning_rates"):
    config_checks.positive(cfg, key)
  need(rc.cloud_samples <= cfg.data.context_size, "cdc_robust.cloud_samples",
       rc.cloud_samples, f"at most the {cfg.data.context_size} context samples a device has")
  for overrides in wide_overrides(cfg).values():
    task.check_meta_data(overrides)
  for key in ("gate_temperatures", "em2_scales"):
    need(all(x >= 0 for x in rc[key]), f"cdc_robust.{key}", rc[key], "values must be >= 0")
  need(all(isinstance(s, int) and s >= 0 for s in rc.cloud_steps), "cdc_robust.cloud_steps",
       rc.cloud_steps, "integers >= 0 (0 = the plain FDA edit)")


def build(ctx, fda, fda_params, summary, reference, base_cost, other_fda_params):
  """The configured variants and controls. `base_cost(hp)` is plain cdc_mmpg's DeviceCost;
  `reference` is cdc_mmpg.reference_set(...); `other_fda_params` {'wide': params}."""
  task, model, params, cfg, cm = ctx.task, ctx.model, ctx.params, ctx.config, ctx.cost_model
  rc, clip = cfg.cdc_robust, cfg.fda.clip
  dbytes = costs.dtype_bytes(cfg.comm_dtype)
  n_ctx = cfg.data.context_size

  def upload_and_generate(params, dev, fda_params=fda_params):
    return cdc_mmpg._generated(task, params, fda, fda_params, cfg, summary, dev)

  def plain(params, dev, fda_params=fda_params):
    return P.apply_edit(params, upload_and_generate(params, dev, fda_params)[0], clip)

  methods = []
  for name in rc.variants:
    row = f"cdc_mmpg_{name}"
    if name == "em2":
      if not task.label_groups:
        continue
      ec = cfg.baselines.prior_em
      source = jnp.asarray(ctx.source_prior)

      def adapt(params, dev, hp):
        return device.label_shift_correction(task, model, plain(params, dev), dev, source,
                                             iterations=ec.iterations,
                                             smoothing=hp["smoothing"], scale=hp["scale"])

      def cost(hp):
        c = base_cost(hp)
        c.device_flops += (cm.forward(n_ctx * len(task.label_groups))
                           + cm.em(n_ctx, ec.iterations))
        return c
      hps = grid(scale=tuple(rc.em2_scales), smoothing=tuple(ec.smoothing))

    elif name == "gate":
      def adapt(params, dev, hp):
        edit, aux = upload_and_generate(params, dev)
        d = cdc_mmpg.code_distance(reference, aux["code"])[0]
        tau = hp["temperature"]
        g = jnp.where(tau > 0, jnp.exp(-jnp.maximum(d - 1.0, 0.0) / jnp.maximum(tau, 1e-9)),
                      1.0)
        return P.apply_edit(params, scale_edit(edit, g), clip)
      cost = base_cost
      hps = grid(temperature=tuple(rc.gate_temperatures))

    elif name == "cloud_tent":
      m = rc.cloud_samples
      loss_fn = device.objective(task, model, "entropy")
      refined_bytes = P.tree_size(P.split(params, rc.cloud_leaves)[1]) * dbytes

      def adapt(params, dev, hp):
        edited = plain(params, dev)           # device: upload, (cloud: FDA edit), merge
        feats = cloud_samples_upload(task, dev, m)                        # device: upload
        return cloud_refine(loss_fn, edited, rc.cloud_leaves, feats, hp)  # cloud: refine

      def cost(hp, m=m, refined_bytes=refined_bytes):
        c = base_cost(hp)
        c.uplink_bytes += m * sample_bytes(task, model, params, dbytes)
        if hp["steps"]:
          c.downlink_bytes += refined_bytes
          c.cloud_flops += hp["steps"] * cm.step(m, rc.cloud_leaves, "entropy", "adam")
        return c
      hps = grid(lr=tuple(rc.cloud_learning_rates), steps=tuple(rc.cloud_steps))

    elif name in ("wide", "wide_mix"):
      if name not in other_fda_params:    # its FDA was not trained (a caller that only wants
        continue                          # the plain FDA's methods: bench, tests)
      def adapt(params, dev, hp, wide=other_fda_params[name]):
        return plain(params, dev, wide)        # the same round trip with the wide FDA
      cost = base_cost
      hps = ({},)

    elif name == "mean_edit":
      mean = mean_applied_edit(reference["edits"], params, clip)
      down = P.tree_size(mean) * dbytes
      merge = cm.merge(jax.eval_shape(lambda: mean))

      def adapt(params, dev, hp, mean=mean):
        return P.apply_edit(params, mean)

      def cost(hp, down=down, merge=merge):
        return costs.DeviceCost(downlink_bytes=float(down), device_flops=merge)
      hps = ({},)

    elif name == "nearest_edit":
      def adapt(params, dev, hp):
        i = cdc_mmpg.code_distance(reference, upload_and_generate(params, dev)[1]["code"])[1]
        return P.apply_edit(params, jax.tree.map(lambda x: x[i], reference["edits"]), clip)
      cost = base_cost
      hps = ({},)

    uses = () if name == "mean_edit" else (task.context_role,)
    methods.append(Method(row, hps, adapt, cost, uses=uses,
                          info={"variant": name, "reference_devices":
                                int(reference["codes"].shape[0])}))
  return methods
