"""The held-out-shift protocol: a validation OOD group of its own shift family, robustness
choices made on it, and the OOD claim read from the row it chooses."""
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import with_value

from mmpg_jax.core import config_errors
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import pipeline
from mmpg_jax.reporting import comparisons
from mmpg_jax.tasks.base import Metric
from mmpg_jax.training import config_checks, evaluate
from mmpg_jax.training.methods import Method


def test_the_held_out_groups_are_disjoint_shift_families(smoke_config):
  d = smoke_config.data
  assert pipeline.shift_family(d, d.val_ood_shift) == {"thickness"}
  assert pipeline.shift_family(d, d.ood_shift) == {"rotation", "blur", "clutter_fragments",
                                                    "clutter_alpha", "noise"}
  # a validation OOD group that previews the test OOD group's family is refused
  bad = with_value(smoke_config, "data.val_ood_shift.blur", (0.5, 0.8))
  with pytest.raises(config_errors.ConfigError, match="disjoint from the test OOD"):
    config_checks.check(bad)
  same = with_value(smoke_config, "data.val_ood_shift.thickness", (-1, 0, 1, 2))
  with pytest.raises(config_errors.ConfigError, match="family of its own"):
    config_checks.check(same)


def test_validation_ood_devices_draw_their_own_family_and_phrasings(smoke_config):
  d = smoke_config.data.to_dict()
  shifts = [md.device_shift(d, "val_ood", i) for i in range(12)]
  assert {int(s["thickness"]) for s in shifts} <= {-2, 3}
  assert all(abs(float(s["rotation"])) <= 45.0 and float(s["blur"]) == 0.0 for s in shifts)
  phrasings = set(md.VAL_OOD_CAPTION_TEMPLATES)
  assert not phrasings & set(md.CAPTION_TEMPLATES + md.OOD_CAPTION_TEMPLATES)
  assert md.caption_templates("val_ood") == md.VAL_OOD_CAPTION_TEMPLATES
  # every word of every phrasing is in the caption vocabulary (no silent UNK)
  words = {w for t in phrasings for w in t.split() if not w.startswith("{")}
  assert words <= set(md.CAPTION_VOCAB)


class _Toy:
  """A one-parameter task: score = w * x, the 'metric' its mean."""
  roles = ("query",)
  query_role = "query"
  selection_metric = Metric("accuracy")

  def scores(self, model, params, q):
    return params["w"] * q["x"]

  def metric_values(self, scores, q):
    return {"accuracy": scores.mean()}


def test_a_robustness_choice_is_made_on_validation_ood_devices():
  task = _Toy()
  feats = lambda x: {"query": {"x": np.full((4, 3), x, np.float32)},
                     "device_id": np.arange(4, dtype=np.int32)}
  val, val_ood, test = feats(1.0), feats(-1.0), feats(2.0)
  grid = ({"w": 1.0}, {"w": -1.0})
  adapt = lambda params, dev, hp: {"w": jnp.float32(hp["w"])}
  plain = Method("plain", grid, adapt, lambda hp: None, uses=("query",))
  robust = Method("robust", grid, adapt, lambda hp: None, uses=("query",), select_on="val_ood")
  ev = evaluate.Evaluator(task, None, device_chunk=4)
  out = ev.run([plain, robust], {"w": 0.0}, val, {"test": test, "val_ood": val_ood})
  assert out["plain"]["hp"] == {"w": 1.0} and out["plain"]["selected_on"] == "validation"
  assert out["robust"]["hp"] == {"w": -1.0} and out["robust"]["selected_on"] == "val_ood"
  # without validation OOD devices the choice falls back to validation
  out = ev.run([robust], {"w": 0.0}, val, {"test": test})
  assert out["robust"]["hp"] == {"w": 1.0} and out["robust"]["selected_on"] == "validation"


def test_the_ood_claim_is_the_row_validation_ood_chooses():
  row = lambda val_ood, test_ood, on="val_ood": {
      "selected_on": on, "metrics": {"accuracy_val_ood": val_ood, "accuracy_ood": test_ood}}
  results = {"methods": {"global": row(0.1, 0.1, "validation"),
                         "cdc_mmpg": row(0.5, 0.6, "validation"),
                         "cdc_mmpg_em2": row(0.6, 0.55),
                         "cdc_mmpg_wide": row(0.4, 0.9),          # best on test OOD: not chosen
                         "cdc_mmpg_mean_edit": row(0.9, 0.9, "validation")}}   # a control
  c = comparisons.ood_choice(results, "accuracy", ood_rows=("cdc_mmpg",))
  assert c["row"] == "cdc_mmpg_em2" and c["test_ood"] == 0.55 and c["plain"] == {"cdc_mmpg": 0.6}
  assert set(c["candidates"]) == {"cdc_mmpg", "cdc_mmpg_em2", "cdc_mmpg_wide"}
