import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_features

from mmpg_jax.adapt import baselines
from mmpg_jax.core import params as P
from mmpg_jax.ondevice import costs, device
from mmpg_jax.training import evaluate
from mmpg_jax.training.methods import MethodContext


def test_em_recovers_a_shifted_label_prior():
  # A calibrated source model under a uniform prior; the target prior is skewed.
  rng = np.random.default_rng(0)
  k, n = 4, 4000
  target = np.array([0.7, 0.1, 0.1, 0.1])
  y = rng.choice(k, n, p=target)
  noisy = rng.random(n) < 0.4                                # x = y, or a random other class
  x = np.where(noisy, (y + rng.integers(1, k, n)) % k, y)
  lik = np.full((n, k), 0.4 / (k - 1))
  lik[np.arange(n), x] = 0.6                                 # p(x | y) as a function of y
  source = np.full(k, 0.25)
  post = lik * source / (lik * source).sum(1, keepdims=True)   # source posteriors
  est = device.em_prior(jnp.asarray(post), jnp.asarray(source), 200, 0.0)
  np.testing.assert_allclose(est, target, atol=0.03)
  # smoothing pulls the estimate towards the source prior
  est_s = device.em_prior(jnp.asarray(post[:20]), jnp.asarray(source), 50, 1e6)
  np.testing.assert_allclose(est_s, source, atol=1e-3)


def _feats(task, model, params, n, seed):
  f, rng = random_features(task, model, params, n, seed)
  f["answer"] = jnp.asarray(rng.integers(0, 14, n), jnp.int32)
  f["qtype"] = jnp.zeros(n, jnp.int32)
  return f


def _ctx(task, model, params, cfg):
  return MethodContext(task=task, model=model, params=params,
                                 cost_model=costs.CostModel(task, model, params), config=cfg,
                                 source_prior=None, val=None, workdir="", metrics=None)


def test_finetune_changes_only_the_selected_leaves_and_lowers_the_loss(smoke_config, task,
                                                                       model_and_params):
  model, params = model_and_params
  f = _feats(task, model, params, 12, 0)
  leaves = ["answer_head/.*"]
  out = device.finetune(device.objective(task, model, "supervised"), params, leaves, f,
                        optimizer="adam", lr=1e-2, steps=30)
  before, after = P.flatten(params), P.flatten(out)
  for path in before:
    same = np.array_equal(before[path], after[path])
    assert same != path.startswith("answer_head/"), path
  ce = lambda p: float(task.loss(model, p, f))
  assert ce(out) < ce(params)


def test_vmapped_evaluation_equals_a_loop_over_devices(smoke_config, task, model_and_params):
  model, params = model_and_params
  devs = [{"support": _feats(task, model, params, 10, s),
           "query": _feats(task, model, params, 8, 100 + s)} for s in range(3)]
  stacked = jax.tree.map(lambda *x: np.stack(x), *devs)
  stacked["device_id"] = np.arange(3, dtype=np.int32)
  stacked["type_q"] = np.zeros((3, 2, smoke_config.model.question_dim), np.float32)
  method = baselines.fta(_ctx(task, model, params, smoke_config), 5)
  hp = {"lr": 0.05, "steps": 3}
  vm = evaluate.Evaluator(task, model, device_chunk=2).per_device_metrics(
      method, params, stacked, hp)["accuracy"]
  accuracy = lambda p, q: task.metric_values(task.scores(model, p, q), q)["accuracy"]
  loop = [float(accuracy(method.adapt(params, d, hp), d["query"])) for d in devs]
  np.testing.assert_allclose(vm, loop, atol=1e-6)


def test_costs_are_measured_and_scale_with_the_work(smoke_config, task, model_and_params):
  model, params = model_and_params
  ctx = _ctx(task, model, params, smoke_config)
  cm = ctx.cost_model
  assert cm.encode(2) > 0 and abs(cm.encode(4) / cm.encode(2) - 2) < 0.2
  m = baselines.fta(ctx, 5)
  c5, c20 = m.cost({"lr": 0.1, "steps": 5}), m.cost({"lr": 0.1, "steps": 20})
  assert c20.device_flops > c5.device_flops > 0
  assert (c5.device_backward_passes, c5.labels_used_per_device) == (25, 5)
  g = baselines.global_method().cost({})
  assert g.device_flops == 0 and g.uplink_bytes == 0 and g.labels_used_per_device == 0


def test_aggregate_over_seeds(tmp_path):
  import json

  from mmpg_jax.reporting import aggregate
  for seed, acc in enumerate((0.8, 0.9)):
    d = tmp_path / f"s{seed}"
    d.mkdir()
    m = {"metrics": {"accuracy": acc, "margin_closed": 0.5}, "labels_used_per_device": 0,
         "device_backward_passes": 0, "uplink_bytes": 10.0, "downlink_bytes": 20.0,
         "per_device": {"accuracy": [acc, acc + 0.1, acc - 0.1, acc]}}
    g = dict(m, per_device={"accuracy": [0.5, 0.6, 0.4, 0.5]})
    methods = {"global": g, "cdc_mmpg": m, **({"cdc_mmpg_opt_in": m} if seed else {})}
    (d / "results.json").write_text(json.dumps(
        {"oracle_global_margin": {"test": 0.1}, "references": ["global", "best_rival"],
         "methods": methods}))
  t = aggregate.table(aggregate.load([str(tmp_path / "s0"), str(tmp_path / "s1")]))
  assert "| cdc_mmpg | 85.00 ± 7.07 | 50% ± 0 |" in t            # sample std, ddof=1
  # a row only the second run has is kept, and says over how many runs its ± is (none: 1 run)
  assert "| cdc_mmpg_opt_in (1 of 2 runs) | 90.00 ± – |" in t
  # paired differences pooled over the runs: (0.3 + 0.4) / 2; each device gains the same
  assert "| cdc_mmpg | +35.00 [+35.00, +35.00]* | – |" in t
  with pytest.raises(FileNotFoundError, match="finished runs"):
    aggregate.load([str(tmp_path / "nope")])


def test_aggregate_adds_rows_of_other_runs_and_more_metrics(tmp_path):
  """--rows: run i's global row from another run on the same data, paired device by device;
  --metrics: every listed metric with its intervals. Runs on other data are refused."""
  import json

  from mmpg_jax.reporting import aggregate

  def run(d, uauc, ndcg, data_seed=0):
    d.mkdir()
    per = lambda v: {"uauc": [v, v + 0.02, v - 0.02], "ndcg@10": [ndcg] * 3}
    g = {"metrics": {"uauc": uauc, "ndcg@10": ndcg, "auc": 0.9}, "labels_used_per_device": 0,
         "device_backward_passes": 0, "uplink_bytes": 0.0, "downlink_bytes": 0.0,
         "per_device": per(uauc)}
    (d / "results.json").write_text(json.dumps(
        {"task": "seqrec", "oracle_global_margin": {}, "num_ood_devices": 0,
         "methods": {"global": g}}))
    (d / "config.json").write_text(json.dumps({"data": {"seed": data_seed}}))
    return str(d)

  main = [run(tmp_path / f"m{i}", 0.80 + i / 100, 0.40) for i in range(2)]
  other = [run(tmp_path / f"o{i}", 0.85 + i / 100, 0.42) for i in range(2)]
  t = aggregate.main(main + ["--rows", "gru4rec=" + ",".join(other),
                             "--metrics", "uauc,ndcg@10,auc", "--references", "global"])
  assert "| gru4rec | 0.8550 ± 0.0071 | 0.4200 ± 0.0000 | 0.9000 ± 0.0000 |" in t
  assert "Differences in ndcg@10" in t and "| gru4rec | +0.0200 [+0.0200, +0.0200]* |" in t
  assert "Differences in auc" not in t                # pooled: no per-device values
  bad = [run(tmp_path / f"x{i}", 0.85, 0.42, data_seed=5) for i in range(2)]
  with pytest.raises(ValueError, match=r"other data .*\['seed'\]"):
    aggregate.main(main + ["--rows", "gru4rec=" + ",".join(bad)])


def test_querybank_normalisation_is_the_dynamic_inverted_softmax():
  """A hub (gallery item 0, every bank query's first) is marked down for the queries whose
  own first item is in the activation set; a query whose first item no bank query retrieves
  first keeps its raw scores (the 'dynamic' of DIS)."""
  bank = jnp.array([[5.0, 1.0, 0.0], [4.0, 0.0, 1.0]])          # both retrieve item 0 first
  scores = jnp.array([[2.0, 1.9, 0.0],                           # first item 0: normalised
                      [0.0, 0.5, 3.0]])                          # first item 2: untouched
  out = baselines.dynamic_inverted_softmax(scores, bank, 1.0)
  np.testing.assert_allclose(out[1], scores[1])
  want = scores[0] - jax.nn.logsumexp(bank, axis=0)
  np.testing.assert_allclose(out[0], want, rtol=1e-6)
  assert int(jnp.argmax(out[0])) == 1 and int(jnp.argmax(scores[0])) == 0   # the hub drops


def test_dual_softmax_weighs_each_score_by_its_query_prior():
  scores = jnp.array([[1.0, 0.2], [0.9, 0.8]])
  out = baselines.dual_softmax(scores, 3.0)
  np.testing.assert_allclose(out, scores * jax.nn.softmax(3.0 * scores, axis=0), rtol=1e-6)
  # item 0 is every query's favourite: the second query, weaker on it, now prefers item 1
  assert int(jnp.argmax(scores[1])) == 0 and int(jnp.argmax(out[1])) == 1
