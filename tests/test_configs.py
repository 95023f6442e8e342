"""The configs: the embedded benchmarks' default runs the headline rows, `study` every row,
`smoke` the study's code path at tiny size; the real-data configs keep every row; every config
composes the shared blocks of configs/common*.py one level deep."""
import ast
import os

import pytest

from mmpg_jax.core import config_loader

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", ["moving_digits_qa", "moving_digits_retrieval",
                                  "digits_persona"])
def test_the_default_is_the_headline_and_the_study_has_every_row(name):
  default, study = config_loader.load(f"{name}.py", ""), config_loader.load(f"{name}.py", "study")
  assert default.baselines.fta.ks == (5,) and study.baselines.fta.ks == (1, 5, 10)
  # every forward-only rival in both (a reader judges the edit against all of them)
  assert default.tta.include == study.tta.include == ("t3a", "lame", "foa")
  assert "random" in default.adr.ablations and not default.adr.k_sweep
  assert len(default.adr.ablations) <= 2 and default.adr.selector in ("herding", "herding_ny32")
  if default.adr.selector != study.adr.selector:     # the cheaper default beside the exact one
    assert study.adr.selector in default.adr.ablations
  assert len(study.adr.ablations) >= 2 and len(study.adr.k_sweep) >= 3
  # one robustness variant (the validation-selected one, where the task has one) + controls
  controls = {"mean_edit", "noisy_mean_edit", "nearest_edit"}
  extra = set(default.cdc_robust.variants) - controls
  assert len(extra) <= 1 and extra <= set(study.cdc_robust.variants)
  assert controls <= set(default.cdc_robust.variants) <= set(study.cdc_robust.variants)
  assert "global_meta" in default.method_families                 # the data-matched control
  # the same data, model and training; meta-training as the study's but for a smaller pool
  for key in ("data", "model", "train"):
    assert default[key].to_dict() == study[key].to_dict(), key
  assert {k: v for k, v in default.fda.items() if k != "meta_devices"} == {
      k: v for k, v in study.fda.items() if k != "meta_devices"}
  assert default.fda.meta_devices <= study.fda.meta_devices
  if "persona" in study:
    assert not default.persona.ablations.prototypes and study.persona.ablations.prototypes


@pytest.mark.parametrize("name", ["seqrec_movielens", "msrvtt_qa", "msvd_qa",
                                  "msrvtt_retrieval"])
def test_the_other_configs_keep_every_row(name):
  c = config_loader.load(f"{name}.py", "")
  assert c.tta.include == ("t3a", "lame", "foa") and len(c.adr.ablations) >= 2
  with pytest.raises(ValueError, match="unknown config variant"):
    config_loader.load(f"{name}.py", "study")


# Every experiment config and the variants it accepts.
VARIANTS = {"moving_digits_qa": ("", "study", "smoke"),
            "moving_digits_retrieval": ("", "study", "smoke"),
            "digits_persona": ("", "study", "smoke"),
            "seqrec_movielens": ("", "smoke", "official", "smoke,global_only,duet_official"),
            "msrvtt_qa": ("", "smoke"), "msvd_qa": ("", "smoke"), "msrvtt_retrieval": ("", "smoke")}
COMMON = ("common.py", "common_data.py")      # the shared blocks
EXPERIMENTS = sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py") and f not in COMMON)


def _loads(file):
  """The files a config file loads (the first argument of each config_loader call)."""
  tree = ast.parse(open(os.path.join(CONFIGS, file)).read())
  return {n.args[0].value for n in ast.walk(tree)
          if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
          and getattr(n.func.value, "id", None) == "config_loader"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_composes_the_common_blocks_only(name):
  """One level: an experiment config loads the common modules, never another experiment
  config (nor with a loader of its own); the common modules load nothing."""
  assert set(COMMON) == _loads(f"{name}.py")
  assert "importlib" not in open(os.path.join(CONFIGS, f"{name}.py")).read()
  for common in COMMON:
    assert not _loads(common)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_every_config_and_variant_names_the_report_references(name, arg):
  c = config_loader.load(f"{name}.py", arg)
  assert c.report.references == ("global", "global_meta", "fta_k5", "best_rival")
  assert c.report.ood_rows == ("cdc_mmpg",)
