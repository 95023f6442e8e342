"""Devices rendered on several host threads come out in order and equal to one thread's."""
import threading
import time

import numpy as np

from mmpg_jax.data import threads


def test_ordered_map_keeps_order_bounds_the_work_ahead_and_runs_the_first_item_alone():
  seen, running, peak = [], [0], [0]
  lock = threading.Lock()

  def fn(i):
    with lock:
      seen.append(i)
      running[0] += 1
      peak[0] = max(peak[0], running[0])
    time.sleep(0.002 * (7 - i % 7))            # later items often finish first
    with lock:
      running[0] -= 1
    return i * i

  out = threads.ordered_map(fn, range(40), threads=3, ahead=2)
  assert next(out) == 0 and seen == [0]       # the first item alone, before any thread
  assert list(out) == [i * i for i in range(1, 40)]
  assert peak[0] <= 3
  assert list(threads.ordered_map(fn, [], threads=3)) == []
  assert list(threads.ordered_map(fn, range(5), threads=1)) == [i * i for i in range(5)]


def test_meta_devices_rendered_on_threads_equal_one_thread(task, model_and_params, bench,
                                                           monkeypatch):
  import jax
  from mmpg_jax.training import meta_train
  model, params = model_and_params
  out = {}
  for n in ("1", "3"):
    monkeypatch.setenv("MMPG_RENDER_THREADS", n)
    out[n] = meta_train.encode_devices(task, model, params, range(10), 4, chunk_devices=5)
  jax.tree.map(np.testing.assert_array_equal, out["1"], out["3"])
