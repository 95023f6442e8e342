"""Test setup: 8 simulated CPU accelerators (set before anything imports jax), tiny data."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by both pytest workers and every subprocess a test
# starts (the entry point is run many times at the same tiny size): XLA compiles each program
# once per machine instead of once per process. Keys cover the program, flags, devices and the
# JAX version, so a hit is the same executable (results.json is byte-identical either way).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"mmpg_jax_tests_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))


def checkpoint_steps(d):
  """The step numbers of an orbax checkpoint folder (empty if it does not exist)."""
  from mmpg_jax.core import checkpointing
  return checkpointing.steps_on_disk(d)


def random_features(task, model, params, n, seed):
  """A task's encoded features of n random samples (pixels 0..254, tokens 1..19, drawn in the
  order of `task.example_inputs`), and the generator, for the caller's labels."""
  import numpy as np
  rng = np.random.default_rng(seed)
  raw = []
  for x in task.example_inputs(n):
    if x.dtype == np.uint8:
      raw.append(rng.integers(0, 255, x.shape, dtype=np.uint8))
    else:
      raw.append(rng.integers(1, 20, x.shape).astype(np.int32))
  return task.encode(model, params, *raw), rng


@pytest.fixture(scope="session")
def smoke_config():
  import moving_digits_qa
  return moving_digits_qa.get_config("smoke")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def bench(smoke_config, data_dir):
  from mmpg_jax.data import pipeline
  return pipeline.prepare(smoke_config.data, data_dir)


@pytest.fixture(scope="session")
def task(smoke_config):
  """The video-QA task of the smoke config."""
  from mmpg_jax import tasks
  return tasks.build(smoke_config)


@pytest.fixture(scope="session")
def model_and_params(task):
  model = task.build_model()
  return model, task.init_params(model, 0)


# Smoke config, trained long enough to be interrupted several times in each training stage.
LONG = ["--config.train.num_steps=60", "--config.train.checkpoint_every=4",
        "--config.train.log_every=4", "--config.fda.num_steps=24", "--config.fda.eval_every=4",
        "--config.fda.checkpoint_every=2"]


def main_cmd(workdir, *extra, module="mmpg_jax.main"):
  """A command line of the real entry point (smoke config) as a subprocess runs it."""
  return [sys.executable, "-m", module, "--config=configs/moving_digits_qa.py:smoke",
          f"--workdir={workdir}", *extra]


def subprocess_env(data_dir):
  """One CPU accelerator (not the 8 simulated ones of the test process), the tests' data."""
  env = dict(os.environ, MMPG_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory, data_dir):
  """One uninterrupted run of `python -m mmpg_jax.main` (smoke config + LONG), made once per
  test session and shared by the pytest-xdist workers: the first worker to need it runs it
  under a file lock, the others wait for it and read the same workdir (no test writes there)."""
  import fcntl
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's base is <session>/popen-gwN; the session folder is common.
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  workdir = root / "clean_run" / "run"
  with open(root / "clean_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (workdir / "results.json").exists():
        r = subprocess.run(main_cmd(workdir, *LONG), cwd=ROOT, env=subprocess_env(data_dir),
                           capture_output=True, text=True, timeout=900)   # a hang guard:
        assert r.returncode == 0, r.stderr[-3000:]   # ~2 min alone, 5+ beside other workers
        (workdir / "stdout.txt").write_text(r.stdout)
        (workdir / "stderr.txt").write_text(r.stderr)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return workdir


# ---------- the no-backward-pass check (CDC-MMPG, its variants, forward-only rivals) ----------

class BackwardPassRan(AssertionError):
  pass


@pytest.fixture
def no_backward(monkeypatch):
  """Every reverse-mode pass in JAX (grad, vjp, value_and_grad, optax) transposes through
  ad.backward_pass* (the name varies across JAX versions); make them all raise."""
  import jax._src.interpreters.ad as ad

  def refuse(*a, **k):
    raise BackwardPassRan("a backward pass ran")

  names = [n for n in dir(ad) if n.startswith("backward_pass")]
  assert names, "JAX changed its transposition entry point; update this fixture"
  for n in names:
    monkeypatch.setattr(ad, n, refuse)


def with_value(cfg, key: str, value):
  """A copy of `cfg` with the dotted `key` set to `value`."""
  out = cfg.copy_and_resolve_references()
  node = out
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return out


def assert_refused_before_any_work(cfg, key: str, value, match: str, tmp_path):
  """The real main job with config.<key> = value stops with a ConfigError matching `match`
  before it creates its workdir."""
  from mmpg_jax import main
  from mmpg_jax.core import config_errors
  with pytest.raises(config_errors.ConfigError, match=match):
    main.run(with_value(cfg, key, value), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
