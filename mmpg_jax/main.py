r"""The main job: task -> data -> global model -> method families -> evaluate -> report.

  python -m mmpg_jax.main --config=configs/<experiment>.py[:smoke] --workdir=DIR

It knows no task and no method family by name: `config.task` picks the task (mmpg_jax.tasks)
and `config.method_families` the modules under mmpg_jax/adapt/ whose `build(ctx)` return the
methods. Rerunning with the same workdir resumes every stage from its last checkpoint.
"""
import importlib
import json
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mmpg_jax import config_checks, costs, evaluate, preemption, report, tasks, train
from mmpg_jax import params as P
from mmpg_jax import workdir as wd
from mmpg_jax.adapt import baselines, device

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and results go")


def method_family(name: str):
  """A method family: `mmpg_jax.adapt.<name>` (or a module path) with `build(ctx)`."""
  path = name if "." in name else f"mmpg_jax.adapt.{name}"
  try:
    module = importlib.import_module(path)
  except ModuleNotFoundError as e:
    raise config_checks.ConfigError(
        f"config.method_families names {name!r}, but {path} cannot be imported ({e}); families "
        f"are modules under mmpg_jax/adapt/ with a build(ctx) function") from e
  return module


def check(config):
  """Every check that needs no data: task, config values, leaf regexes, each method family's
  own block (its optional `validate_config`). Returns (task, model, family modules)."""
  task = tasks.build(config)
  config_checks.validate(config, task)
  families = [method_family(f) for f in config.method_families]
  model = task.build_model()
  abstract = jax.eval_shape(lambda: task.init_params(model, config.seed))
  P.select(abstract, config.dynamic_leaves)
  device.cached_features_valid(abstract, config.dynamic_leaves, task.encoder_prefixes)
  for family in families:
    if hasattr(family, "validate_config"):
      family.validate_config(config, task, model, abstract)
  return task, model, families


def run(config, workdir: str) -> dict:
  """Runs every stage; returns the results dict (also written to WORKDIR/results.json)."""
  t_start = time.time()
  # Everything a config can get wrong fails here, before the workdir is touched.
  task, model, families = check(config)

  workdir = wd.prepare(workdir)
  wd.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  metrics = wd.MetricsWriter(workdir)

  t = time.time()
  data = task.prepare_data()
  logging.info("data ready in %.1fs", time.time() - t)

  t = time.time()
  params = train.train_global(task, model, config, data, workdir, metrics)
  logging.info("global model ready in %.1fs", time.time() - t)

  t = time.time()
  val = task.encode_split(model, params, data.devices("validation"))
  groups = {"test": task.encode_split(model, params, data.devices("test"))}
  if config.data.num_ood_devices > 0:
    groups["test_ood"] = task.encode_split(model, params, data.devices("test_ood"))
  logging.info("encoded evaluation devices in %.1fs", time.time() - t)

  cm = costs.CostModel(task, model, params)
  ctx = baselines.MethodContext(task=task, model=model, params=params, cost_model=cm,
                                config=config, source_prior=task.source_prior(data), val=val,
                                workdir=workdir, metrics=metrics)
  methods = []
  for family in families:
    t = time.time()
    methods += family.build(ctx)
    logging.info("method family %s ready in %.1fs", family.__name__, time.time() - t)
  t = time.time()
  evals = evaluate.Evaluator(task, model, config.eval.device_chunk).run(methods, params, val,
                                                                       groups)
  logging.info("evaluated %d methods in %.1fs", len(methods), time.time() - t)
  method_costs = {m.name: m.cost(evals[m.name]["hp"]) for m in methods}
  method_info = {m.name: m.info for m in methods}

  # Nothing time- or host-dependent goes into results.json: the same seed gives the same bytes.
  extra = {"device_model_bytes": P.tree_bytes(params), **ctx.extra,
           "device_inference_flops_per_sample": costs.inference_flops_per_sample(cm)}
  results = report.build_results(config, task, evals, method_costs, extra, method_info)
  report.write_report(workdir, results, config, task)
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
