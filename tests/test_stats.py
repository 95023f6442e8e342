"""Sample spreads, paired bootstrap intervals and the differences table."""
import numpy as np

from mmpg_jax.reporting import comparisons, stats


def test_sample_std_uses_ddof_1_and_skips_non_finite():
  assert np.isclose(stats.sample_std([1.0, 2.0, 3.0, np.nan]), 1.0)
  assert np.isnan(stats.sample_std([1.0]))


def test_paired_bootstrap_covers_the_mean_and_shrinks_with_devices():
  rng = np.random.default_rng(0)
  small = rng.normal(0.5, 1.0, 30)
  m, lo, hi = stats.paired_bootstrap(small)
  assert lo < m < hi and np.isclose(m, small.mean())
  # about 1.96 standard errors each side
  se = small.std(ddof=1) / np.sqrt(30)
  assert 0.8 * 1.96 * se < (hi - lo) / 2 < 1.2 * 1.96 * se
  big = rng.normal(0.5, 1.0, 3000)
  _, blo, bhi = stats.paired_bootstrap(big)
  assert bhi - blo < (hi - lo) / 5 and stats.excludes_zero((0, blo, bhi))
  assert not stats.excludes_zero(stats.paired_bootstrap(rng.normal(0.0, 1.0, 20)))


def test_runs_are_strata_and_clusters_resample_whole_devices():
  # two runs: each run's mean counts once, whatever its number of devices
  m, _, _ = stats.paired_bootstrap([np.ones(10), np.zeros(1000)])
  assert np.isclose(m, 0.5)
  # a device's windows move together: constant within a device, the interval is the
  # devices' interval, wider than if the 8 windows were independent devices
  dev = np.repeat(np.random.default_rng(1).normal(0.0, 1.0, 10), 8)
  ids = np.repeat(np.arange(10), 8)
  _, lo_c, hi_c = stats.paired_bootstrap([dev], [ids])
  _, lo_i, hi_i = stats.paired_bootstrap([dev])
  assert hi_c - lo_c > 2 * (hi_i - lo_i)


def test_differences_against_each_reference():
  pd = lambda *v: {"accuracy": list(v)}
  # the references are the config's (report.references), carried in results.json; a named
  # reference the run does not hold (global_meta here) gives no column
  run = {"references": ["global", "global_meta", "best_rival"], "methods": {
      "global": {"per_device": pd(0.5, 0.5, 0.5), "role": "baseline"},
      "lame": {"per_device": pd(0.6, 0.6, 0.6), "role": "rival",
               "validation_accuracy": 0.7},
      "t3a": {"per_device": pd(0.9, 0.9, 0.9), "role": "rival",
              "validation_accuracy": 0.6},        # better on test, worse on validation
      "cdc_mmpg": {"per_device": pd(0.7, 0.8, 0.9), "role": "ours"}}}
  assert comparisons.best_rival(run, "accuracy") == "lame"
  d = comparisons.differences([run], "accuracy")
  assert list(d) == ["global", "best_rival"]
  assert list(comparisons.differences([run], "accuracy", refs=("cdc_mmpg",))) == ["cdc_mmpg"]
  assert np.isclose(d["global"]["cdc_mmpg"]["test"][0], 0.3)
  assert np.isclose(d["best_rival"]["cdc_mmpg"]["test"][0], 0.2)
  assert "lame" not in d["best_rival"]                 # a row is not compared with itself
  lines = comparisons.table_lines(d, type("M", (), {"percent": True, "decimals": 1})())
  assert lines[0].startswith("| method | − global (test)")
