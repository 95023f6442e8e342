r"""The main job: task -> data -> global model -> method families -> evaluate -> report.

  python -m mmpg_jax.main --config=configs/<experiment>.py[:smoke] --workdir=DIR
  python -m mmpg_jax.main --config=... --workdir=DIR --deploy_only   # the deployment studies
                                                       # of a finished run again (config.deploy)

It knows no task and no method family by name: `config.task` picks the task (mmpg_jax.tasks)
and `config.method_families` the modules under mmpg_jax/adapt/ whose `build(ctx)` return the
methods. Rerunning with the same workdir resumes every stage from its last checkpoint.
"""
import dataclasses
import json
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mmpg_jax import deploy
from mmpg_jax.core import params as P
from mmpg_jax.core import preemption, timing
from mmpg_jax.core import workdir as wd
from mmpg_jax.ondevice import costs
from mmpg_jax.reporting import deploy_sections, report
from mmpg_jax.training import config_checks, evaluate, train
from mmpg_jax.training.methods import MethodContext

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and results go")
_DEPLOY_ONLY = flags.DEFINE_bool(
    "deploy_only", False, "rerun only the deployment studies and the frontier of a finished "
    "run (its results.json), with this config's deploy block and the hyper-parameters the "
    "run selected: no method is evaluated again")


def build(config, workdir: str):
  """Every stage up to the methods (data, global model, encoded evaluation devices, method
  families): (task, model, params, families, methods, ctx, groups). Finished stages resume."""
  # Everything a config can get wrong fails here, before the workdir is touched.
  task, model, families = config_checks.check(config)

  workdir = wd.prepare(workdir)
  wd.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  metrics = wd.MetricsWriter(workdir)

  t = time.time()
  with timing.span("data"):
    data = task.prepare_data()
  logging.info("data ready in %.1fs", time.time() - t)

  t = time.time()
  with timing.span("global_training"):
    params, global_summary = train.train_global(task, model, config, data, workdir, metrics)
  logging.info("global model ready in %.1fs", time.time() - t)

  t = time.time()
  with timing.span("encode_eval_devices"):
    val = task.encode_split(model, params, data.devices("validation"))
    groups = {"test": task.encode_split(model, params, data.devices("test"))}
    if config.data.num_ood_devices > 0:
      groups["test_ood"] = task.encode_split(model, params, data.devices("test_ood"))
    if config.data.get("num_val_ood_devices", 0) > 0:
      # the held-out shift family robustness choices are made on (a validation group)
      groups["val_ood"] = task.encode_split(model, params, data.devices("val_ood"))
  logging.info("encoded evaluation devices in %.1fs", time.time() - t)

  cm = costs.CostModel(task, model, params)
  ctx = MethodContext(task=task, model=model, params=params, cost_model=cm,
                      config=config, source_prior=task.source_prior(data), val=val,
                      workdir=workdir, metrics=metrics)
  if global_summary:                 # the global model's validation curve and chosen length
    ctx.extra["training_curves"] = {"global": global_summary}
  methods = []
  for name, family in zip(config.method_families, families):
    t = time.time()
    short = name.rsplit(".", 1)[-1]
    # each row knows the family that built it (a family may set it itself)
    with timing.span(f"family_{short}"):
      methods += [m if m.family else dataclasses.replace(m, family=short)
                  for m in family.build(ctx)]
    logging.info("method family %s ready in %.1fs", family.__name__, time.time() - t)
  deploy.check_names(methods, config)       # before the evaluation's minutes
  return task, model, params, families, methods, ctx, groups


def device_costs(methods, evals, ctx, config) -> dict:
  """{name: DeviceCost} at each method's selected hyper-parameters, with the device's peak
  memory (its resident model + the largest working set of what it runs)."""
  # a device answers one query at a time; adaptation programs run as the method runs them
  # (a context window, a gradient step's batch, at once)
  inference = costs.inference_working_bytes(ctx.cost_model, 1)
  return {m.name: m.cost(evals[m.name]["hp"]).with_device_memory(P.tree_bytes(ctx.params),
                                                                   inference)
          for m in methods}


def run(config, workdir: str) -> dict:
  """Runs every stage; returns the results dict (also written to WORKDIR/results.json)."""
  # Stage wall times go to report.md and metrics.jsonl, never results.json.
  with timing.recording() as clock:
    task, model, params, families, methods, ctx, groups = build(config, workdir)
    workdir, metrics, val, cm = ctx.workdir, ctx.metrics, ctx.val, ctx.cost_model
    t = time.time()
    evaluator = evaluate.Evaluator(task, model, config.eval.device_chunk)
    with timing.span("evaluation"):
      evals = evaluator.run(methods, params, val, groups)
    logging.info("evaluated %d methods in %.1fs", len(methods), time.time() - t)
    with timing.span("device_costs"):
      method_costs = device_costs(methods, evals, ctx, config)
    with timing.span("deployment"):
      deployment = deploy.run(evaluator, task, model, params, config, methods, method_costs,
                              evals, val, groups)

    # Nothing time- or host-dependent goes into results.json: the same seed gives the same
    # bytes.
    extra = {"device_model_bytes": P.tree_bytes(params), **ctx.extra,
             "device_inference_flops_per_sample": costs.inference_flops_per_sample(cm),
             **({"deployment": deployment} if deployment else {})}
    results = report.build_results(config, task, evals, method_costs, extra, methods)
    with timing.span("report"):
      report.write_report(workdir, results, config, task, families)
  wall = clock.wall()
  # The time table: report.md's last section (written again with it; the table itself never
  # enters results.json) and metrics.jsonl's `done` row.
  report.write_time_table(workdir, clock.rows(wall), wall, "this run")
  metrics.write("done", 0, wall_seconds=wall,
                **{f"{r['stage']}_seconds": r["seconds"] for r in clock.rows(wall)
                   if not r["depth"]})
  logging.info("wrote %s/results.json and report.md in %.0fs", workdir, wall)
  # The answer, where the user is looking: the headline table (report.md has the rest).
  print("\n".join([f"\n{results['benchmark']} ({results['task']}): {workdir}/report.md, "
                   f"{wall:.0f} s", ""] + report.headline_table(results, task)), flush=True)
  return results


def redeploy(config, workdir: str) -> dict:
  """The deployment studies (config.deploy) and the frontier of a finished run, again: the
  stages resume from their checkpoints, each method keeps the hyper-parameters the run's
  results.json selected, and results.json and report.md are rewritten with the new studies."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: --deploy_only reruns the deployment "
                            f"studies of a finished run; run the main job on {workdir} first")
  with open(path) as f:
    results = json.load(f)
  with timing.recording() as clock:
    task, model, params, families, methods, ctx, groups = build(config, workdir)
    evals = {}
    for m in methods:
      row = results["methods"].get(m.name)
      if row is None or row["selected_hparams"] not in list(m.grid):
        raise ValueError(f"{path} does not hold method {m.name!r} at a setting of its grid: "
                         f"the run was made with another config; rerun the main job instead")
      evals[m.name] = {"hp": row["selected_hparams"]}
    method_costs = device_costs(methods, evals, ctx, config)
    for name, c in method_costs.items():
      results["methods"][name].update(c.as_dict())
    t = time.time()
    with timing.span("deployment"):
      deployment = deploy.run(evaluate.Evaluator(task, model, config.eval.device_chunk), task,
                              model, params, config, methods, method_costs, evals, ctx.val,
                              groups)
    results.pop("deployment", None)
    if deployment:
      results["deployment"] = deployment
    results["frontier"] = deploy_sections.frontier(results, task, int(config.data.query_size))
    report.write_report(ctx.workdir, results, config, task, families)
  report.write_time_table(ctx.workdir, clock.rows(), clock.wall(), "this --deploy_only run")
  ctx.metrics.write("deploy_only", 0, deployment_seconds=time.time() - t)
  logging.info("rewrote %s/results.json and report.md with new deployment studies", workdir)
  return results


def use_compilation_cache() -> None:
  """JAX's persistent compilation cache: XLA compiles each program once per machine, not once
  per run, so the second seed of a study skips the minutes the first spent compiling. The
  executables are the same (keys cover program, flags, devices and JAX version): results.json
  is byte-identical either way. $JAX_COMPILATION_CACHE_DIR picks the folder ("" turns it off)."""
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                        os.path.expanduser("~/.cache/mmpg_jax/xla"))
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv):
  wd.quiet_library_logs()
  use_compilation_cache()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  preemption.install()
  if os.environ.get("MMPG_DISTRIBUTED"):
    jax.distributed.initialize()   # multi-host TPU: JAX's runtime finds the coordinator
  try:
    (redeploy if _DEPLOY_ONLY.value else run)(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    raise


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
