r"""The main job: data -> global model -> device methods -> results.json / report.md.

  python -m mmpg_jax.main --config=configs/moving_digits_qa.py[:smoke] --workdir=DIR

Rerunning with the same workdir resumes every stage from its last checkpoint.
"""
import json
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mmpg_jax import config_checks, costs, evaluate, meta_train, models, preemption, report, train
from mmpg_jax import params as P
from mmpg_jax import workdir as wd
from mmpg_jax.adapt import baselines, cdc_mmpg, device
from mmpg_jax.adapt import fda as fda_lib
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and results go")


def run(config, workdir: str) -> dict:
  """Runs every stage; returns the results dict (also written to WORKDIR/results.json)."""
  t_start = time.time()
  # Everything a config can get wrong fails here, before the workdir is touched.
  config_checks.validate(config)
  model = models.build(config.model, md.NUM_ANSWERS, len(md.VOCAB))
  abstract = jax.eval_shape(lambda: train.init_params(model, config.data, config.seed))
  P.select(abstract, config.dynamic_leaves)
  device.cached_features_valid(abstract, config.dynamic_leaves)
  edited = P.select(abstract, config.fda.edit_leaves)
  config_checks.validate(config, {p: s.shape for p, s in P.flatten(abstract).items()
                                  if p in edited})

  workdir = wd.prepare(workdir)
  wd.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  metrics = wd.MetricsWriter(workdir)

  t = time.time()
  bench = pipeline.prepare(config.data)
  logging.info("data ready in %.1fs", time.time() - t)

  t = time.time()
  params = train.train_global(model, config, bench, workdir, metrics)
  logging.info("global model ready in %.1fs", time.time() - t)

  t = time.time()
  val = evaluate.encode_split(model, params, bench.devices("validation"))
  groups = {"test": evaluate.encode_split(model, params, bench.devices("test"))}
  if config.data.num_ood_devices > 0:
    groups["test_ood"] = evaluate.encode_split(model, params, bench.devices("test_ood"))
  logging.info("encoded evaluation devices in %.1fs", time.time() - t)

  cm = costs.CostModel(model, params, config.data)
  source_prior = train.answer_prior(bench)
  methods = baselines.build(model, cm, config, source_prior)

  t = time.time()
  fda = fda_lib.from_config(config, params, source_prior)
  summary = cdc_mmpg.device_summary(model, config, source_prior)
  fda_params, fda_summary = meta_train.train_fda(model, fda, params, config, val, workdir,
                                                 metrics, summary)
  methods += cdc_mmpg.build(fda, fda_params, cm, config, summary)
  logging.info("FDA ready in %.1fs (%s)", time.time() - t, fda_summary)
  t = time.time()
  evals = evaluate.Evaluator(model, config.eval.device_chunk).run(methods, params, val, groups)
  logging.info("evaluated %d methods in %.1fs", len(methods), time.time() - t)
  method_costs = {m.name: m.cost(evals[m.name]["hp"]) for m in methods}
  method_info = {m.name: m.info for m in methods}

  # Nothing time- or host-dependent goes into results.json: the same seed gives the same bytes.
  extra = {"device_model_bytes": P.tree_bytes(params),
           "fda": {**fda_summary, "params": P.tree_size(fda_params)},
           "device_inference_flops_per_sample": costs.inference_flops_per_sample(cm)}
  results = report.build_results(config, evals, method_costs, extra, method_info)
  report.write_report(workdir, results, config)
  wall = time.time() - t_start
  metrics.write("done", 0, wall_seconds=wall)
  logging.info("wrote %s/results.json and report.md in %.0fs", workdir, wall)
  return results


class _QuietLibraries:
  """Drops orbax's and TFDS's per-save INFO chatter from the absl log; warnings still show."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/")
    if "Using custom data configuration" in str(record.msg):
      return False
    return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  preemption.install()
  if os.environ.get("MMPG_DISTRIBUTED"):
    jax.distributed.initialize()   # multi-host TPU: JAX's runtime finds the coordinator
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    raise


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
