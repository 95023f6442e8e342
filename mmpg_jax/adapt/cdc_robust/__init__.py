"""CDC-MMPG beyond its training shifts: variants and controls, as rows `cdc_mmpg_<name>`.

Every variant starts from the plain cdc_mmpg round trip (ADR anchors + summary up, FDA edit
down) and keeps its promise: no backward pass and no label on the device. Each has a grid that
contains the plain method (scale 0, no gate, zero steps), so selection on validation devices
can fall back to it. `config.cdc_robust.variants` picks the rows, each a registered builder
(registry.py: variants.py, controls.py; the wide-data rules in wide.py, the cloud-TENT helpers
in cloud.py, the routed mixture's router in router.py, the report section in report.py).

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
from absl import logging

from mmpg_jax.adapt.cdc_robust import controls  # noqa: F401  (they register)
from mmpg_jax.adapt.cdc_robust import report as robust_report
from mmpg_jax.adapt.cdc_robust import router as router_lib
from mmpg_jax.adapt.cdc_robust import variants  # noqa: F401  (they register)
from mmpg_jax.adapt.cdc_robust.controls import mean_applied_edit  # noqa: F401
from mmpg_jax.adapt.cdc_robust.env import Env
from mmpg_jax.adapt.cdc_robust.registry import REGISTRY
from mmpg_jax.adapt.cdc_robust.variants import scale_edit  # noqa: F401
from mmpg_jax.adapt.cdc_robust.wide import mix_overrides, wide_data, wide_overrides  # noqa: F401
from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import need, positive
from mmpg_jax.fda import round_trip
from mmpg_jax.fda import stage as fda_stage
from mmpg_jax.tasks.capabilities import LabelGroups, ShiftedMetaData
from mmpg_jax.training.methods import Method

CONTROLS = tuple(n for n, v in REGISTRY.items() if v.role == "control")
VARIANTS = tuple(n for n in REGISTRY if n not in CONTROLS) + CONTROLS


def validate_config(cfg, task, model, abstract_params) -> None:
  """The cdc_robust block; ConfigError names the key (called before any work)."""
  rc = cfg.cdc_robust
  fams = tuple(cfg.method_families)
  need("cdc_mmpg" in fams and fams.index("cdc_mmpg") < fams.index("cdc_robust"),
       "method_families", fams, "cdc_robust builds on the plain FDA that the cdc_mmpg family "
       "meta-trains: list 'cdc_mmpg' before 'cdc_robust'")
  for v in rc.variants:
    need(v in REGISTRY, "cdc_robust.variants", rc.variants, f"known: {VARIANTS}")
  for key in ("cdc_robust.cloud_samples", "cdc_robust.cloud_learning_rates"):
    positive(cfg, key)
  need(rc.cloud_samples <= cfg.data.context_size, "cdc_robust.cloud_samples",
       rc.cloud_samples, f"at most the {cfg.data.context_size} context samples a device has")
  for v in rc.variants:
    for other, why in REGISTRY[v].needs:
      need(other in rc.variants, "cdc_robust.variants", rc.variants, f"{why}: add '{other}' too")
  if set(rc.variants) & {"wide", "wide_mix", "wide_text", "routed"}:
    _validate_wide(cfg, task)
  if "routed" in rc.variants:
    _validate_router(cfg, task)
  for key in ("gate_temperatures", "em2_scales", "noise_scales"):
    need(all(x >= 0 for x in rc[key]), f"cdc_robust.{key}", rc[key], "values must be >= 0")
  need(all(isinstance(s, int) and s >= 0 for s in rc.cloud_steps), "cdc_robust.cloud_steps",
       rc.cloud_steps, "integers >= 0 (0 = the plain FDA edit)")
  if "cloud_tent" in rc.variants:     # its leaves matter only when it runs
    P.select(abstract_params, rc.cloud_leaves)


def _validate_wide(cfg, task) -> None:
  """The wide rule, and that the task can draw meta devices from other shift ranges."""
  rc = cfg.cdc_robust
  rule = rc.wide_rule
  need(float(rule.factor) > 0, "cdc_robust.wide_rule.factor", rule.factor, "a factor > 0")
  known = set(cfg.data.shift)
  need(set(rule.families) <= known, "cdc_robust.wide_rule.families", rule.families,
       f"shift keys of data.shift: {sorted(known)}")
  wide = wide_overrides(cfg)
  need(not wide or isinstance(task, ShiftedMetaData), "cdc_robust.variants", rc.variants,
       f"task {task.name!r} cannot meta-train on other data (it is not a "
       f"capabilities.ShiftedMetaData task); remove {tuple(wide)} from the variants")
  for overrides in wide.values():
    task.check_meta_data(overrides)


def _validate_router(cfg, task) -> None:
  rc = cfg.cdc_robust
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
  """The configured variants and controls as rows `cdc_mmpg_<name>`, for the plain FDA and
  `other_fda_params` {'wide': params, ..., 'routed': (router, router params)} (a variant
  whose FDA is missing is left out: a caller that only has the plain FDA, e.g. a test, gets
  the rest)."""
  env = Env(ctx, fda, fda_params, summary, other_fda_params)
  n_ref = int(env.reference["codes"].shape[0])
  methods = []
  for name in ctx.config.cdc_robust.variants:
    v = REGISTRY[name]
    if v.label_groups and not isinstance(ctx.task, LabelGroups):
      continue
    built = v.build(env)
    if built is None:
      continue
    methods.append(Method(
        f"cdc_mmpg_{name}", built.grid, built.adapt, built.cost,
        uses=(ctx.task.context_role,) if v.uses_upload else (), select_on=v.select_on,
        diagnostics=built.diagnostics, per_device_diagnostics=tuple(built.diagnostics),
        role=v.role, family="cdc_robust", seen=v.seen(ctx.config),
        info={"reference_devices": n_ref}))
  return methods


def report_lines(results, task, workdir) -> list:
  """cdc_robust's own section of report.md: the variants beside the rivals, and routing."""
  return robust_report.robustness_lines(results, task)
