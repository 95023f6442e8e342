"""The task interface: a toy task defined here runs through the real main job; the batch
generation path equals the evaluated cdc_mmpg path on both embedded tasks; retrieval's heads
and metrics; bad task configs and uploads."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_features

from mmpg_jax import generate, main, tasks
from mmpg_jax.core import config_errors
from mmpg_jax.core import params as P
from mmpg_jax.core import upload as upload_lib
from mmpg_jax.data import pipeline
from mmpg_jax.fda import model as fda_lib
from mmpg_jax.fda import round_trip
from mmpg_jax.tasks import capabilities, video_retrieval
from mmpg_jax.tasks.base import Metric, Task, stack

# ---------- a toy task: 3-class Gaussian blobs, devices with label and mean shift -------------

class _BlobsModel(nn.Module):
  def setup(self):
    self.encoder = nn.Dense(8)
    self.head = nn.Dense(3)

  def encode(self, x):
    return nn.relu(self.encoder(x))

  def logits(self, h):
    return self.head(h)

  def __call__(self, x):
    return self.logits(self.encode(x))


def _blob_device(seed, split, index, sizes, ood=False):
  rng = np.random.default_rng([seed, split, index])
  prior = rng.dirichlet(np.full(3, 0.5))
  offset = rng.normal(0, 2.0 if ood else 0.7, 4)
  dev = {"device_id": np.int32(index)}
  for r, (role, n) in enumerate(sizes.items()):
    rr = np.random.default_rng([seed, split, index, r + 1])
    y = rr.choice(3, n, p=prior)
    x = np.eye(3, 4)[y] * 2.0 + offset + rr.normal(0, 0.8, (n, 4))
    dev[role] = {"x": x.astype(np.float32), "y": y.astype(np.int32)}
  return dev


class _BlobData:
  def __init__(self, cfg):
    self.cfg = cfg

  def global_batches(self, batch_size, seed):
    cfg = self.cfg

    class _Batches:
      def __getitem__(self, step):
        devs = [_blob_device(seed, 1, step * 4 + j, {"train": batch_size // 4}) for j in range(4)]
        return {k: np.concatenate([d["train"][k] for d in devs]) for k in ("x", "y")}
    return _Batches()

  def devices(self, split):
    d = self.cfg.data
    n = {"validation": d.num_val_devices, "test": d.num_test_devices,
         "test_ood": d.num_ood_devices}[split]
    sizes = {"context": d.context_size, "support": d.support_size, "query": d.query_size,
             "oracle": d.oracle_size}
    devs = [_blob_device(self.cfg.data.seed, 2 + ("validation", "test", "test_ood").index(split),
                         i, sizes, ood=(split == "test_ood")) for i in range(n)]
    for dv in devs:
      del dv["context"]["y"]                       # the context is unlabelled
    return stack(devs)


class CoreToyTask(Task):
  """The core interface only, for 3-class blobs: ~50 lines, no change outside this class."""
  name = "toy_core"
  datasets = ("toy_blobs",)
  metrics = (Metric("accuracy"),)
  encoder_prefixes = ("encoder/",)
  anchor_modalities = ("feat",)

  def build_model(self):
    return _BlobsModel()

  def example_inputs(self, n):
    return (jnp.zeros((n, 4)),)

  def example_labels(self, n):
    return {"y": jnp.zeros((n,), jnp.int32)}

  def encode(self, model, params, x):
    return {"h": model.apply({"params": params}, x, method=model.encode)}

  def prepare_data(self):
    return _BlobData(self.config)

  def encode_split(self, model, params, devices):
    out = {"device_id": devices["device_id"]}
    for role in self.roles:
      out[role] = dict(self.encode(model, params, devices[role]["x"]))
      if "y" in devices[role]:
        out[role]["y"] = devices[role]["y"]
    return jax.tree.map(np.asarray, out)

  def global_loss(self, model, params, batch):
    loss = self.loss(model, params, {**self.encode(model, params, batch["x"]), "y": batch["y"]})
    return loss, {}

  def scores(self, model, params, feats):
    return model.apply({"params": params}, feats["h"], method=model.logits)

  def metric_values(self, scores, feats):
    return {"accuracy": (scores.argmax(-1) == feats["y"]).mean()}

  def loss(self, model, params, feats):
    return optax.softmax_cross_entropy_with_integer_labels(
        self.scores(model, params, feats), feats["y"]).mean()

  def anchor_elements(self, context):
    return {"feat": context["h"]}

  def meta_devices(self, indices, query_size):
    sizes = {"context": self.config.data.context_size, "query": query_size}
    return stack([_blob_device(0, 9, int(i), sizes) for i in indices])

  def encode_meta(self, model, params, raw):
    return {r: {**self.encode(model, params, raw[r]["x"]), "y": raw[r]["y"]}
            for r in ("context", "query")}

  def meta_loss(self, model, params, query):
    s = self.scores(model, params, query)
    return (optax.softmax_cross_entropy_with_integer_labels(s, query["y"]).mean(),
            (s.argmax(-1) == query["y"]).mean())


class ToyTask(CoreToyTask, capabilities.LabelGroups, capabilities.ScoredContext):
  """The same blobs with two declared capabilities: label groups and an entropy on the
  context (prior_em, em2, TENT, the FDA's anchor EM then apply)."""
  name = "toy"
  label_groups = ((0, 3),)
  label_bias_leaf = "head/bias"

  def source_prior(self, data):
    return np.full(3, 1 / 3, np.float32)

  def entropy(self, model, params, feats):
    lp = jax.nn.log_softmax(self.scores(model, params, feats))
    return -(jnp.exp(lp) * lp).sum(-1).mean()

  def label_posteriors(self, model, params, dev):
    return jax.nn.softmax(self.scores(model, params, dev["context"]))[:, None, :]

  def asked_posteriors(self, model, params, dev):
    return jax.nn.softmax(self.scores(model, params, dev["context"]))

  def element_labels(self, dev):
    return dev["context"]["y"][:, None]


def _toy_config(smoke_config):
  cfg = smoke_config.copy_and_resolve_references()
  cfg.unlock()
  cfg.task, cfg.benchmark = "toy", "toy_blobs"
  cfg.data = type(cfg.data)(dict(name="toy_blobs", seed=0, num_global_devices=4,
                                 num_val_devices=3, num_test_devices=3, num_ood_devices=2,
                                 context_size=8, support_size=10, query_size=8, oracle_size=12))
  cfg.model = type(cfg.model)(dict(name="toy"))
  cfg.dynamic_leaves = ("head/.*",)
  cfg.baselines.fta.leaves = cfg.baselines.oracle.leaves = cfg.fda.edit_leaves = ("head/.*",)
  cfg.baselines.tent.leaves = cfg.cdc_robust.cloud_leaves = ("head/bias",)
  # every cdc_mmpg variant but `wide` and the two-expert rows built on it (the toy's data has
  # no shift ranges to widen)
  cfg.cdc_robust.variants = tuple(v for v in cfg.cdc_robust.variants
                                  if v not in ("wide", "routed", "routed_em2", "ensemble"))
  cfg.lock()
  return cfg


def test_a_task_defined_outside_the_package_runs_through_the_real_main_job(smoke_config,
                                                                          tmp_path):
  tasks.register("toy", ToyTask)
  res = main.run(_toy_config(smoke_config), str(tmp_path / "w"))
  assert res["task"] == "toy" and res["num_eval_devices"] == 3 and res["num_ood_devices"] == 2
  # every generic family applies: the baselines (prior_em: the toy has a label group) and
  # CDC-MMPG meta-trained on the toy's own meta devices
  assert {"global", "fta_k5", "tent", "prior_em", "oracle", "cdc_mmpg"} <= set(res["methods"])
  assert "qb_norm" not in res["methods"]                  # the toy ranks no gallery
  assert {"cdc_mmpg_em2", "cdc_mmpg_nearest_edit"} <= set(res["methods"])   # variants too
  # the data-matched control and the FDA that edits it, on a task that knows nothing of them
  assert {"global_meta", "cdc_mmpg_on_global_meta"} <= set(res["methods"])
  assert "t3a" not in res["methods"]                      # no classifier_features
  on_disk = json.loads((tmp_path / "w" / "results.json").read_text())
  assert on_disk["methods"]["cdc_mmpg"]["device_backward_passes"] == 0
  assert on_disk["methods"]["fta_k5"]["labels_used_per_device"] == 5
  assert "| cdc_mmpg |" in (tmp_path / "w" / "report.md").read_text()


def test_a_core_only_task_and_a_toy_rival_plug_in_through_the_public_seams(smoke_config,
                                                                           tmp_path):
  """A task implementing only the core interface, and a rival added as its own module
  (tests/toy_rival.py), a method_families entry and its config block: both run through the
  real main job and the rival appears in the report and the comparisons; the capability-bound
  rows (prior_em, TENT, T3A, em2) are left out for the core task."""
  tasks.register("toy_core", CoreToyTask)
  cfg = _toy_config(smoke_config)
  with cfg.unlocked():
    cfg.task = "toy_core"
    cfg.baselines.include = ("global", "fta", "oracle")
    cfg.method_families = ("baselines", "toy_rival", "cdc_mmpg")
    cfg.fda.bases = ("global",)
    cfg.toy_rival = type(cfg.fda)(dict(temperatures=(0.5, 1.0, 2.0)))
  res = main.run(cfg, str(tmp_path / "w"))
  assert {"global", "fta_k5", "oracle", "toy_rival", "cdc_mmpg"} <= set(res["methods"])
  assert not {"prior_em", "tent", "t3a"} & set(res["methods"])
  row = res["methods"]["toy_rival"]
  assert row["role"] == "rival" and row["family"] == "toy_rival"
  assert res["best_rival"] == "toy_rival"                  # the run's only rival
  assert "toy_rival" in res["differences"]["global"]        # compared with the references
  assert res["differences"]["best_rival"]["cdc_mmpg"]       # ... and as the best rival
  report = (tmp_path / "w" / "report.md").read_text()
  assert "| toy_rival |" in report and "rival validation ranks first (toy_rival)" in report


# ---------- bad task configs ------------------------------------------------------------------

@pytest.mark.parametrize("key,value,error,match", [
    ("task", "video_qq", tasks.UnknownTaskError,
     r"video_qq.*known tasks: .*video_qa.*video_retrieval"),
    ("data.name", "msrvtt", config_errors.ConfigError,       # task and data disagree
     r"data.name='msrvtt'.*reads \('moving_digits', 'msrvtt_qa', 'msvd_qa'\)"),
    ("method_families", ("baselines", "persnoa"), config_errors.ConfigError,
     r"persnoa.*mmpg_jax.adapt.persnoa"),
    ("data.cloud_caption_mix", (1.0, 0.0), config_errors.ConfigError,
     r"cloud_caption_mix.*6 non-negative"),
])
def test_bad_task_configs_are_refused_before_any_work(smoke_config, tmp_path, key, value,
                                                      error, match):
  cfg = smoke_config.copy_and_resolve_references()
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(error, match=match):
    main.run(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# ---------- generation path == evaluated path, on both embedded tasks -------------------------

@pytest.fixture(scope="module", params=["moving_digits_qa", "moving_digits_retrieval"])
def trained_fda(request, data_dir):
  import importlib
  cfg = importlib.import_module(request.param).get_config("smoke")
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, 0)
  data = pipeline.prepare(cfg.data, data_dir)
  val = task.encode_split(model, params, data.devices("validation"))
  prior = task.source_prior(data)
  fda = fda_lib.from_config(cfg, task, params, prior, task.anchor_dims(model, params))
  leaves, tdef = jax.tree.flatten(fda_lib.init(fda, jax.random.key(0)))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  fp = jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape)
                                 for x, k in zip(leaves, keys)])
  summary = round_trip.device_summary(task, model, cfg, prior)
  return cfg, task, model, params, val, fda, fp, summary


def test_batch_generation_gives_the_edits_the_evaluated_method_applies(trained_fda):
  cfg, task, model, params, val, fda, fp, summary = trained_fda
  key = lambda dev: round_trip.device_key(cfg.seed, dev)
  kw = dict(selector=cfg.adr.selector, k=cfg.adr.k)
  uploads = jax.vmap(lambda dev: round_trip.device_upload(task, params, dev, key=key(dev),
                                                        summary=summary, **kw))(val)
  assert set(uploads.anchors) == set(task.anchor_modalities)
  edits = generate.EditGenerator(fda, fp, device_batch=8)(uploads)     # validated, sharded
  evaluated = jax.vmap(lambda dev: round_trip.adapt_device(
      task, params, fda, fp, dev, clip=cfg.fda.clip, key=key(dev), summary=summary, **kw))(val)
  for i in range(len(val["device_id"])):
    edit_i = jax.tree.map(lambda x: x[i], edits)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(edit_i))
    batch_path = P.apply_edit(params, edit_i, cfg.fda.clip)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y[i], rtol=1e-5, atol=1e-6),
                 batch_path, evaluated)


def test_an_upload_missing_a_modality_or_the_summary_is_refused(trained_fda):
  cfg, task, model, params, val, fda, fp, summary = trained_fda
  dev = jax.tree.map(lambda x: x[0], val)
  up = round_trip.device_upload(task, params, dev, selector="herding", k=2,
                              key=jax.random.key(0), summary=summary)
  spec = fda.upload_spec()
  upload_lib.validate_upload(up, spec)                      # the real upload passes
  for mod in task.anchor_modalities:
    bad = {"anchors": {m: a for m, a in up.anchors.items() if m != mod},
           "weights": {m: w for m, w in up.weights.items() if m != mod}}
    if up.summary is not None:
      bad["summary"] = up.summary
    with pytest.raises(upload_lib.UploadError, match=rf"no \['{mod}'\] anchors; this FDA was "
                                                   rf"meta-trained with anchors of"):
      upload_lib.validate_upload(bad, spec)
  if spec["summary"]:
    with pytest.raises(upload_lib.UploadError, match="no 'summary'"):
      upload_lib.validate_upload(up.replace(summary=None), spec)


# ---------- retrieval: heads, loss and metrics ------------------------------------------------

@pytest.fixture(scope="module")
def retrieval():
  import moving_digits_retrieval
  cfg = moving_digits_retrieval.get_config("smoke")
  task = tasks.build(cfg)
  model = task.build_model()
  return cfg, task, model, task.init_params(model, 0)


def _pairs(task, model, params, n, seed):
  f, rng = random_features(task, model, params, n, seed)
  f["content"] = jnp.asarray(rng.integers(0, 6, n), jnp.int32)
  return f


def test_retrieval_zero_edit_is_the_base_model_and_vmapped_equals_looped(retrieval):
  cfg, task, model, params = retrieval
  _, dynamic = P.split(params, cfg.dynamic_leaves)
  f = _pairs(task, model, params, 7, 0)
  base = task.scores(model, params, f)
  zero = task.scores(model, P.apply_edit(params, P.zeros_edit(dynamic), cfg.fda.clip), f)
  assert np.array_equal(np.asarray(base), np.asarray(zero))
  assert base.shape == (7, 7)                             # texts x videos
  devs = [_pairs(task, model, params, 7, s) for s in range(3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *devs)
  one = lambda dv: task.metric_values(task.scores(model, params, dv), dv)
  vm = jax.vmap(one)(stacked)
  for i, dv in enumerate(devs):
    for k, v in one(dv).items():
      np.testing.assert_allclose(vm[k][i], v, rtol=1e-6)
  # the similarity is a temperature-scaled cosine: bounded by exp(logit_scale)
  assert float(jnp.abs(base).max()) <= float(jnp.exp(params["logit_scale"])) + 1e-4


def test_retrieval_ranks_count_same_content_videos_as_hits():
  scores = jnp.array([[0.9, 0.8, 0.1, 0.0],      # query content 0: best video 1 (content 0)
                      [0.9, 0.1, 0.2, 0.3],      # query content 2: video 3 has it, 2 above
                      [0.0, 0.1, 0.2, 0.3]])     # query content 1: video 2 is the only one
  query, gallery = jnp.array([0, 2, 1]), jnp.array([3, 0, 1, 2])
  assert video_retrieval.hit_ranks(scores, query, gallery).tolist() == [1, 1, 1]
  m = video_retrieval.retrieval_metrics(scores, query, gallery)
  assert float(m["r1"]) == 0.0 and float(m["r5"]) == 1.0 and float(m["median_rank"]) == 2.0
  m = video_retrieval.retrieval_metrics(jnp.eye(3), jnp.arange(3), jnp.arange(3))
  assert float(m["r1"]) == 1.0 and float(m["median_rank"]) == 1.0


def test_retrieval_ties_count_against_the_query():
  """A constant scorer ranks every match last (R@1 = 0, median rank = the gallery's size),
  as seqrec's ranking does; one tie with the best match costs a place; NaN ranks last."""
  n = 8
  m = video_retrieval.retrieval_metrics(jnp.zeros((n, n)), jnp.arange(n), jnp.arange(n))
  assert float(m["r1"]) == 0.0 and float(m["r5"]) == 0.0 and float(m["median_rank"]) == n
  tie = jnp.array([[0.5, 0.5, 0.1]])               # the match (video 0) tied with video 1
  assert video_retrieval.hit_ranks(tie, jnp.array([0]), jnp.array([0, 1, 2])).tolist() == [1]
  nan = jnp.array([[jnp.nan, 0.2, 0.1]])
  assert video_retrieval.hit_ranks(nan, jnp.array([0]), jnp.array([0, 1, 2])).tolist() == [2]
  from mmpg_jax.core import rec_metrics
  r = rec_metrics.ranking(np.zeros((1, 5)), np.array([[1, 0, 0, 0, 0]]), ks=(1,))
  assert float(r["hr@1"][0]) == 0.0


def test_info_nce_treats_duplicate_captions_as_positives():
  content = jnp.array([0, 0, 1])
  good = jnp.array([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
  bad = good[::-1]
  assert float(video_retrieval.info_nce(good, content)) < float(
      video_retrieval.info_nce(bad, content))
  # the loss's minimum is log(#positives): equal logits over the two same-content videos
  np.testing.assert_allclose(float(video_retrieval.info_nce(10 * good, content)),
                             (2 * np.log(2) + 0) / 3, atol=1e-3)
