"""Formatting shared by report.md's sections: the run's report and each family's own.

A leaf module, so that a method family can write its report section (`report_lines`) without
importing the run-level report.
"""
import numpy as np

from mmpg_jax.core.protocol import BASE

# Metric key suffix of each evaluated group: test, test OOD, and validation OOD (the held-out
# shift family robustness choices are made on; reported, never a test group).
SUFFIX = {"test": "", "test_ood": "_ood", "val_ood": "_val_ood"}


def fmt(metric, x):
  """Rates in %, other metrics (ranks) as they are."""
  if x is None or not np.isfinite(x):
    return "–"
  return f"{100 * x:.{metric.decimals}f}" if metric.percent else f"{x:.{metric.decimals}f}"


def fmt_flops(x):
  """FLOPs to 3 significant digits, 0 as 0."""
  return "0" if not x else f"{x:.3g}"


def share(x):
  """A share of the oracle - global margin in %; '–' without an oracle."""
  return "–" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


def gains(results, method, sel, sfx):
  """Per-device gain of `method` over global in metric `sel` (group suffix `sfx`), or None."""
  m, g = results["methods"], results["methods"][BASE]
  if method not in m or sel + sfx not in m[method]["per_device"]:
    return None
  return np.asarray(m[method]["per_device"][sel + sfx]) - np.asarray(g["per_device"][sel + sfx])
