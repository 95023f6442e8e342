"""Meta-device pools: encoded once per run, reused by every stage that reads the same devices,
invalidated when what they depend on changes."""
import glob
import os

import jax
import numpy as np
import pytest

from mmpg_jax import tasks
from mmpg_jax.core import params as P
from mmpg_jax.training import meta_pool, meta_train


class Counting:
  """The task with its meta_devices counted: which ids were rendered."""

  def __init__(self, task):
    self.task, self.rendered = task, []

  def __getattr__(self, name):
    return getattr(self.task, name)

  def meta_devices(self, indices, query_size, context_size=None):
    self.rendered += [int(i) for i in indices]
    return self.task.meta_devices(indices, query_size, context_size)


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _encode(task, params, ids, workdir, q=4):
  return meta_train.encode_devices(task, task.build_model(), params, ids, q, workdir=workdir,
                                   chunk_devices=4)


@pytest.fixture(scope="module")
def fresh(task, model_and_params, bench):
  """Ids 0..11 encoded without any store: what every stored read must equal."""
  _, params = model_and_params
  return _encode(task, params, range(12), None)


def test_a_pool_is_encoded_once_and_read_by_every_later_request(task, model_and_params,
                                                                  fresh, tmp_path):
  _, params = model_and_params
  t = Counting(task)
  first = _encode(t, params, range(8), str(tmp_path))
  assert sorted(set(t.rendered)) == list(range(8))
  _equal(first, jax.tree.map(lambda v: v[:8], fresh))
  t.rendered.clear()
  again = _encode(t, params, range(8), str(tmp_path))          # a later stage: nothing rendered
  sub = _encode(t, params, range(2, 6), str(tmp_path))          # the reference set: a slice
  assert t.rendered == []
  _equal(again, first)
  _equal(sub, jax.tree.map(lambda v: v[2:6], fresh))
  more = _encode(t, params, range(12), str(tmp_path))           # a bigger pool: only the rest
  assert sorted(set(t.rendered)) == list(range(8, 12))
  _equal(more, fresh)
  files = glob.glob(os.path.join(tmp_path, meta_pool.FOLDER, "*.npz"))
  assert len(files) == 1 and files[0].endswith("-0-12.npz")     # the extended pool replaced it


def test_a_pool_is_invalidated_when_its_encoder_changes_not_when_a_dynamic_leaf_does(
    task, model_and_params, smoke_config, tmp_path):
  _, params = model_and_params
  t = Counting(task)
  _encode(t, params, range(4), str(tmp_path))
  flat = P.flatten(params)
  encoder = sorted(p for p in flat if p.startswith(tuple(task.encoder_prefixes)))
  dynamic = P.select(params, smoke_config.dynamic_leaves)
  assert encoder and dynamic
  bumped = lambda paths: P.unflatten({p: (v + 0.5 if p in paths else v) for p, v in flat.items()})
  t.rendered.clear()
  on_global_meta = _encode(t, bumped(set(dynamic)), range(4), str(tmp_path))
  assert t.rendered == []               # fda_on_global_meta reads the plain FDA's pool
  _equal(on_global_meta, _encode(task, bumped(set(dynamic)), range(4), None))
  new_encoder = _encode(t, bumped({encoder[0]}), range(4), str(tmp_path))
  assert sorted(set(t.rendered)) == list(range(4))
  _equal(new_encoder, _encode(task, bumped({encoder[0]}), range(4), None))
  other_data = tasks.build(smoke_config.copy_and_resolve_references())
  with other_data.config.unlocked():
    other_data.config.data.seed = 1
  assert meta_pool.pool_key(other_data, params, 4, None) != meta_pool.pool_key(task, params, 4,
                                                                               None)
  assert meta_pool.pool_key(task, params, 5, None) != meta_pool.pool_key(task, params, 4, None)


def test_a_damaged_pool_is_reported_and_encoded_again(task, model_and_params, fresh, tmp_path):
  _, params = model_and_params
  _encode(task, params, range(4), str(tmp_path))
  (path,) = glob.glob(os.path.join(tmp_path, meta_pool.FOLDER, "*.npz"))
  with open(path, "r+b") as f:
    f.truncate(100)
  t = Counting(task)
  _equal(_encode(t, params, range(4), str(tmp_path)), jax.tree.map(lambda v: v[:4], fresh))
  assert sorted(set(t.rendered)) == list(range(4))
  assert len(glob.glob(os.path.join(tmp_path, meta_pool.FOLDER, "*.npz"))) == 1


@pytest.mark.parametrize("config", ["moving_digits_qa", "moving_digits_retrieval", "digits_persona",
                                    "seqrec_movielens"])
def test_encode_meta_reads_only_the_static_encoders(config, data_dir, monkeypatch):
  """The contract the pool key rests on, for every task: leaves outside
  `task.encoder_prefixes` do not change what `encode_meta` returns."""
  import importlib
  monkeypatch.setenv("MMPG_DATA_DIR", data_dir)
  cfg = importlib.import_module(config).get_config("smoke")
  task = tasks.build(cfg)
  model = task.build_model()
  params = task.init_params(model, 0)
  raw = task.meta_devices(range(2), int(cfg.fda.meta_query_size))
  flat = P.flatten(params)
  others = {p: v + 0.5 for p, v in flat.items()
            if not p.startswith(tuple(task.encoder_prefixes))}
  assert task.encoder_prefixes and others
  enc = jax.jit(lambda p, r: task.encode_meta(model, p, r))
  _equal(enc(params, raw), enc(P.unflatten({**flat, **others}), raw))
