"""The wide-data rules: the `config.data` overrides the wide variants' meta-training draws from.

Each is a rule stated up front that reads the training ranges only; the task's data layer turns
it into ranges (`task.with_data`, a `ShiftedMetaData` task) and refuses it if it would draw a
value only a held-out group (test OOD, validation OOD) shows."""


def wide_data(cfg) -> dict:
  """config.data overrides of the wide variants: the training ranges of the shift families
  `cdc_robust.wide_rule.families` widened by `wide_rule.factor`."""
  rule = cfg.cdc_robust.wide_rule
  return {"widen": {"factor": float(rule.factor), "families": tuple(rule.families)}}


def mix_overrides(cfg) -> dict:
  """config.data overrides of the mixture: a share `wide_mix_fraction` of the meta devices
  drawn from `wide_data`'s shift ranges, the rest from training's (`wide_mix`, the router)."""
  rc = cfg.cdc_robust
  return {"meta_wide": {"fraction": float(rc.wide_mix_fraction), **wide_data(cfg)}}


def wide_text_data(cfg) -> dict:
  """`wide_data` plus text-side domain randomisation (`cdc_robust.caption_noise`)."""
  return {**wide_data(cfg), "caption_noise": cfg.cdc_robust.caption_noise.to_dict()}


# The variants that meta-train an FDA of their own, and on what.
OVERRIDES = {"wide": wide_data, "wide_mix": mix_overrides, "wide_text": wide_text_data}


def wide_overrides(cfg) -> dict:
  """{variant: config.data overrides} of the configured variants that meta-train their own
  FDA, in OVERRIDES' order."""
  return {name: rule(cfg) for name, rule in OVERRIDES.items()
          if name in cfg.cdc_robust.variants}
