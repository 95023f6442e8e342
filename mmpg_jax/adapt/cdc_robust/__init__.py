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
              `wide_data(cfg)`: the training ranges of the families `wide_rule.families`
              widened by `wide_rule.factor`, a rule stated up front that reads the training
              ranges only; refused if it would draw a value only a held-out group (test OOD,
              validation OOD) shows (task.check_meta_data, discrete keys included); the
              device side is plain cdc_mmpg's.
  wide_mix    the same over a mixture (stage `fda_wide_mix`): a share `wide_mix_fraction` of
              the meta devices draws from `wide_data`'s ranges, the rest from the training
              ones, so meta-training still sees in-distribution devices as often as those.
  wide_text   `wide`'s data plus text-side domain randomisation (stage `fda_wide_text`;
              retrieval: the QA model reads no caption): each meta device draws a share of
              captions in shuffled word order and of phrasing words (never the content)
              replaced by UNK from `caption_noise`'s ranges. Never an OOD phrasing: its words
              are never drawn.
  routed      a mixture of experts (router.py): the plain and the `wide` FDA, frozen, and a
              small router in the cloud (stage `router`, meta-trained on the `wide_mix`
              mixture) that weighs their edits from their domain codes of the upload; the
              device side is plain cdc_mmpg's, with the experts' low-rank factors side by side
              in the downlink. Needs `wide`. Grid: `router_sharpness`, a factor on the
              router's logits (1 = as trained; larger = closer to top-1 routing).
  routed_em2  em2's second round on the device after routed's edit.
  ensemble    routed's two experts with equal weights, no router (the router's initial
              state): is it the routing or the averaging of two edits that helps? Needs
              `routed`.
Controls (does the FDA condition on the device?)
  mean_edit     the mean of the reference meta devices' applied (clipped) edits, the same for
                every device: no upload.
  nearest_edit  the edit of the reference meta device nearest to the upload in the FDA's code
                space: a lookup table over meta-training's devices.
  noisy_mean_edit  the mean edit plus Gaussian noise of the reference edits' own per-element
                spread (x `noise_scales`, chosen on validation), drawn per device: does a
                generated edit beat a random perturbation of the training edits' mean at
                their scale (the memorisation control of weight generators)? No upload.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmpg_jax import costs, device
from mmpg_jax import params as P
from mmpg_jax.adapt import cdc_robust_report as robust_report
from mmpg_jax.adapt import router as router_lib
from mmpg_jax.config_errors import need, positive
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import reference as reference_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.methods import Method, grid

CONTROLS = ("mean_edit", "noisy_mean_edit", "nearest_edit")
VARIANTS = ("em2", "gate", "cloud_tent", "wide", "wide_mix", "wide_text", "routed", "routed_em2",
            "ensemble", "mean_edit", "nearest_edit", "noisy_mean_edit")


def seen_devices(cfg, name) -> int:
  """Meta devices behind a variant's row: its FDA's pool (a wide variant's FDA is its own,
  trained from scratch), or both FDAs' and the router's."""
  n = int(cfg.fda.meta_devices)
  if name in ("routed", "routed_em2", "ensemble"):
    return 2 * n + int(cfg.cdc_robust.router.meta_devices)
  return n


def seen_shifts(name) -> str:
  """Which shift families a variant's meta-training drew from."""
  if name in ("wide", "wide_text"):
    return "wide_data" + (" + caption noise" if name == "wide_text" else "")
  if name in ("wide_mix", "routed", "routed_em2", "ensemble"):
    return "training + wide_data (mixture)"
  return "training"


def mix_overrides(cfg) -> dict:
  """config.data overrides of the mixture: a share `wide_mix_fraction` of the meta devices
  drawn from `wide_data`'s shift ranges, the rest from training's (`wide_mix`, the router)."""
  rc = cfg.cdc_robust
  return {"meta_wide": {"fraction": float(rc.wide_mix_fraction), **wide_data(cfg)}}


def wide_data(cfg) -> dict:
  """config.data overrides of the wide variants: the stated rule `cdc_robust.wide_rule` (the
  training ranges of the named shift families widened by its factor), which the task's data
  layer turns into ranges (`task.with_data`). The rule reads the training ranges only; the
  task's guard refuses it if it would draw a value only a held-out group (test OOD,
  validation OOD) shows."""
  rule = cfg.cdc_robust.wide_rule
  return {"widen": {"factor": float(rule.factor), "families": tuple(rule.families)}}


def wide_overrides(cfg) -> dict:
  """{variant: config.data overrides} of the variants that meta-train their own FDA."""
  rc, out = cfg.cdc_robust, {}
  if "wide" in rc.variants:
    out["wide"] = wide_data(cfg)
  if "wide_mix" in rc.variants:
    out["wide_mix"] = mix_overrides(cfg)
  if "wide_text" in rc.variants:
    out["wide_text"] = {**wide_data(cfg), "caption_noise": rc.caption_noise.to_dict()}
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


def validate_config(cfg, task, model, abstract_params) -> None:
  """The cdc_robust block; ConfigError names the key (called before any work)."""
  rc = cfg.cdc_robust
  fams = tuple(cfg.method_families)
  need("cdc_mmpg" in fams and fams.index("cdc_mmpg") < fams.index("cdc_robust"),
       "method_families", fams, "cdc_robust builds on the plain FDA that the cdc_mmpg family "
       "meta-trains: list 'cdc_mmpg' before 'cdc_robust'")
  for v in rc.variants:
    need(v in VARIANTS, "cdc_robust.variants", rc.variants, f"known: {VARIANTS}")
  for key in ("cdc_robust.cloud_samples", "cdc_robust.cloud_learning_rates"):
    positive(cfg, key)
  need(rc.cloud_samples <= cfg.data.context_size, "cdc_robust.cloud_samples",
       rc.cloud_samples, f"at most the {cfg.data.context_size} context samples a device has")
  if set(rc.variants) & {"wide", "wide_mix", "wide_text", "routed"}:
    rule = rc.wide_rule
    need(float(rule.factor) > 0, "cdc_robust.wide_rule.factor", rule.factor, "a factor > 0")
    known = set(cfg.data.shift)
    need(set(rule.families) <= known, "cdc_robust.wide_rule.families", rule.families,
         f"shift keys of data.shift: {sorted(known)}")
  for overrides in wide_overrides(cfg).values():
    task.check_meta_data(overrides)
  for v in ("routed_em2", "ensemble"):
    need(v not in rc.variants or "routed" in rc.variants, "cdc_robust.variants", rc.variants,
         f"'{v}' builds on 'routed''s experts: add 'routed' too")
  if "routed" in rc.variants:
    need("wide" in rc.variants, "cdc_robust.variants", rc.variants,
         "'routed' mixes the plain and the 'wide' FDA's edits: add 'wide' too")
    positive(cfg, "cdc_robust.router_sharpness")
    task.check_meta_data(mix_overrides(cfg))
    for key in ("hidden", "meta_devices", "num_steps", "learning_rate", "eval_every",
                "checkpoint_every", "log_every"):
      positive(cfg, f"cdc_robust.router.{key}")
    need(isinstance(rc.router.hidden, int), "cdc_robust.router.hidden", rc.router.hidden,
         "an integer width")
    need(rc.router.meta_devices >= cfg.fda.devices_per_step, "cdc_robust.router.meta_devices",
         rc.router.meta_devices, f"at least fda.devices_per_step ({cfg.fda.devices_per_step}) "
         "meta devices, the router's batch")
  for key in ("gate_temperatures", "em2_scales", "noise_scales"):
    need(all(x >= 0 for x in rc[key]), f"cdc_robust.{key}", rc[key], "values must be >= 0")
  need(all(isinstance(s, int) and s >= 0 for s in rc.cloud_steps), "cdc_robust.cloud_steps",
       rc.cloud_steps, "integers >= 0 (0 = the plain FDA edit)")
  if "cloud_tent" in rc.variants:     # its leaves matter only when it runs
    P.select(abstract_params, rc.cloud_leaves)


def build(ctx):
  """Reads the plain FDA from its finished stage (the cdc_mmpg family trained it), meta-trains
  the FDAs of `wide`, `wide_mix`, `wide_text` (stages `fda_<name>`) and the router of `routed`
  (stage `router`) when configured, then the variants and controls."""
  task, model, params, cfg = ctx.task, ctx.model, ctx.params, ctx.config
  fda, summary = round_trip.fda_and_summary(task, model, params, cfg, ctx.source_prior)
  fda_params = fda_stage.load_finished(fda, cfg, ctx.workdir)
  other = {}
  for name, overrides in wide_overrides(cfg).items():
    # The same FDA meta-trained over a wider shift distribution (never the OOD-only ranges):
    # `wide` draws every meta device from it, `wide_mix` a fraction (the rest as training's).
    other[name], wide_summary = fda_stage.train_fda(
        task.with_data(overrides), model, fda, params, cfg, ctx.val,
        ctx.workdir, ctx.metrics, summary, stage=f"fda_{name}")
    ctx.extra[f"fda_{name}"] = wide_summary
    logging.info("FDA %s ready (%s)", name, wide_summary)
  if "routed" in cfg.cdc_robust.variants:
    # A router over the frozen plain and wide FDAs, meta-trained on the mixture.
    r, rp, router_summary = router_lib.train(
        task.with_data(mix_overrides(cfg)), model, fda, (fda_params, other["wide"]),
        params, cfg, ctx.val, ctx.workdir, ctx.metrics, summary)
    other["routed"] = (r, rp)
    ctx.extra["router"] = router_summary
  return make_methods(ctx, fda, fda_params, summary, other)


def make_methods(ctx, fda, fda_params, summary, other_fda_params):
  """The configured variants and controls, for the plain FDA and `other_fda_params`
  {'wide': params, ..., 'routed': (router, router params)} (a variant whose FDA is missing is
  left out: a caller that only has the plain FDA, e.g. a test, gets the rest)."""
  task, model, params, cfg, cm = ctx.task, ctx.model, ctx.params, ctx.config, ctx.cost_model
  reference = reference_lib.shared(ctx, fda, fda_params, summary)
  base_cost = round_trip.cost_fns(task, model, params, cfg, cm, fda, fda_params, summary)(
      cfg.adr.selector, cfg.adr.k)
  rc, clip = cfg.cdc_robust, cfg.fda.clip
  dbytes = costs.dtype_bytes(cfg.comm_dtype)
  n_ctx = cfg.data.context_size

  def upload_and_generate(params, dev, fda_params=fda_params):
    return round_trip.generated(task, params, fda, fda_params, cfg, summary, dev)

  def plain(params, dev, fda_params=fda_params):
    return P.apply_edit(params, upload_and_generate(params, dev, fda_params)[0], clip)

  def with_em2(first, first_cost, first_grid):
    """(adapt, cost, grid) of a second forward round on the device after `first`: every
    label group of its context asked once more of the edited model, and EM's remaining label
    shift applied as scale x log-ratio on the label bias."""
    ec = cfg.baselines.prior_em
    source = jnp.asarray(ctx.source_prior)

    def adapt(params, dev, hp):
      return device.label_shift_correction(task, model, first(params, dev, hp), dev, source,
                                           iterations=ec.iterations,
                                           smoothing=hp["smoothing"], scale=hp["scale"])

    def cost(hp):
      c = first_cost(hp)
      c.device_flops += cm.label_shift(n_ctx, ec.iterations)
      return c
    second = grid(scale=tuple(rc.em2_scales), smoothing=tuple(ec.smoothing))
    return adapt, cost, tuple(dict(a, **b) for a in first_grid for b in second)

  has_routed = "routed" in other_fda_params and "wide" in other_fda_params
  if has_routed:
    r, rp = other_fda_params["routed"]
    experts = (fda_params, other_fda_params["wide"])

    def routed(params, dev, sharpness=1.0):
      up = round_trip.default_upload(task, params, dev, cfg, summary)
      return router_lib.generate(fda, experts, r, rp, up, sharpness)

    def routed_adapt(params, dev, hp):
      return P.apply_edit(params, routed(params, dev, hp["sharpness"])[0], clip)

    up = fda_lib.example_upload(fda, cfg.adr.k)        # a device's upload: K anchors
    routed_edit = jax.eval_shape(lambda: router_lib.generate(fda, experts, r, rp, up)[0])
    routed_down = fda_lib.edit_bytes(routed_edit, dbytes)
    # The cloud runs every expert and the router where plain cdc_mmpg runs one FDA
    # (arguments, not closed-over constants, which XLA would fold away at compile time).
    routed_cloud = (
        costs.flops(lambda e, p, u: router_lib.generate(fda, e, r, p, u), experts, rp, up)
        - costs.flops(lambda p, u: fda.apply({"params": p}, u), fda_params, up))
    routed_merge = cm.merge(routed_edit) - cm.merge(fda_lib.edit_shape(fda, fda_params))

    def routed_cost(hp):
      c = base_cost(hp)
      c.downlink_bytes, c.cloud_flops = float(routed_down), c.cloud_flops + routed_cloud
      c.device_flops += routed_merge
      return c
    routed_grid = grid(sharpness=tuple(rc.router_sharpness))

  methods = []
  for name in rc.variants:
    row, diags = f"cdc_mmpg_{name}", {}
    if name in ("em2", "routed_em2"):
      if not task.label_groups or (name == "routed_em2" and not has_routed):
        continue
      if name == "em2":
        adapt, cost, hps = with_em2(lambda params, dev, hp: plain(params, dev), base_cost,
                                    ({},))
      else:
        adapt, cost, hps = with_em2(routed_adapt, routed_cost, routed_grid)

    elif name == "gate":
      def adapt(params, dev, hp):
        edit, aux = upload_and_generate(params, dev)
        d = reference_lib.code_distance(reference, aux["code"])[0]
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
          # backpropagation, on the cloud, through features the device uploaded
          c.cloud_backward_passes += m * hp["steps"]
        return c
      hps = grid(lr=tuple(rc.cloud_learning_rates), steps=tuple(rc.cloud_steps))

    elif name in ("wide", "wide_mix", "wide_text"):
      if name not in other_fda_params:    # its FDA was not trained (a caller that only wants
        continue                          # the plain FDA's methods: bench, tests)
      def adapt(params, dev, hp, wide=other_fda_params[name]):
        return plain(params, dev, wide)        # the same round trip with the wide FDA
      cost = base_cost
      hps = ({},)

    elif name == "routed":
      if not has_routed:                  # its FDAs were not trained (bench, tests)
        continue
      adapt, cost, hps = routed_adapt, routed_cost, routed_grid
      # The wide expert's weight per device: does the router send unseen shifts to it?
      diags = {"route_wide": lambda dev: routed(params, dev)[1]["weights"][1]}

    elif name == "ensemble":
      if not has_routed:
        continue
      # Sharpness 0: equal weights whatever the router says (+ its few FLOPs in the cost).
      adapt = lambda params, dev, hp: routed_adapt(params, dev, {"sharpness": 0.0})
      cost, hps = routed_cost, ({},)

    elif name == "mean_edit":
      mean = mean_applied_edit(reference["edits"], params, clip)
      down = P.tree_size(mean) * dbytes
      merge = cm.merge(jax.eval_shape(lambda: mean))

      def adapt(params, dev, hp, mean=mean):
        return P.apply_edit(params, mean)

      def cost(hp, down=down, merge=merge):
        return costs.DeviceCost(downlink_bytes=float(down), device_flops=merge)
      hps = ({},)

    elif name == "noisy_mean_edit":
      applied = reference["applied"]
      centre, spread = applied.mean(0), applied.std(0)
      paths = tuple(P.edit_leaves(jax.tree.map(lambda x: x[0], reference["edits"])))
      down = float(applied.shape[1] * dbytes)
      merge = cm.merge(jax.eval_shape(lambda: reference_lib.unflatten_applied(
          centre, params, paths)))

      def adapt(params, dev, hp, centre=centre, spread=spread, paths=paths):
        # the device's own key, folded apart from its random anchor selectors' stream
        key = jax.random.fold_in(round_trip.device_key(cfg.seed, dev), 17)
        noise = jax.random.normal(key, centre.shape)
        vec = centre + hp["scale"] * spread * noise
        return P.apply_edit(params, reference_lib.unflatten_applied(vec, params, paths), clip)

      def cost(hp, down=down, merge=merge):
        return costs.DeviceCost(downlink_bytes=down, device_flops=merge)
      hps = grid(scale=tuple(rc.noise_scales))

    elif name == "nearest_edit":
      def adapt(params, dev, hp):
        i = reference_lib.code_distance(reference, upload_and_generate(params, dev)[1]["code"])[1]
        return P.apply_edit(params, jax.tree.map(lambda x: x[i], reference["edits"]), clip)
      cost = base_cost
      hps = ({},)

    uses = () if name in ("mean_edit", "noisy_mean_edit") else (task.context_role,)
    # a robustness variant's choices (its grid, and whether to use it at all) are made on
    # the validation OOD devices; the controls are chosen on validation like cdc_mmpg
    select_on = "validation" if name in CONTROLS else "val_ood"
    methods.append(Method(row, hps, adapt, cost, uses=uses, select_on=select_on,
                          diagnostics=diags, per_device_diagnostics=tuple(diags),
                          info={"variant": name, "reference_devices":
                                int(reference["codes"].shape[0]),
                                "meta_devices": seen_devices(cfg, name),
                                "shifts": seen_shifts(name)}))
  return methods


def report_lines(results, task, workdir) -> list:
  """cdc_robust's own section of report.md: the variants beside the rivals, and routing."""
  return robust_report.robustness_lines(results, task)
