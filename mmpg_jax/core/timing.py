"""Where a run spends its time: named, nested spans recorded while a `recording()` is open.

The main job opens one recording; the code that runs a stage (the stage loop, a pool's
encoding, a method's evaluation) opens a `span(name)` around it, without knowing who records:
outside a recording a span costs nothing and records nothing. Spans nest (a family's meta-
training stages inside the family), and a span entered again under the same parent adds to its
row. Wall times never go into results.json (a run's bytes stay a function of its seed); the
table goes to report.md and metrics.jsonl.
"""
import contextlib
import contextvars
import time

_CLOCK = contextvars.ContextVar("mmpg_jax_timing_clock", default=None)
_PATH = contextvars.ContextVar("mmpg_jax_timing_path", default=())


class Clock:
  """The spans of one recording: {path (tuple of names): [seconds, times entered]}, in the
  order they were first entered."""

  def __init__(self):
    self.spans = {}
    self.start = time.perf_counter()

  def add(self, path, seconds: float):
    row = self.spans.setdefault(path, [0.0, 0])
    row[0] += seconds
    row[1] += 1

  def wall(self) -> float:
    return time.perf_counter() - self.start

  def rows(self, wall: float | None = None) -> list:
    """[{'stage': 'a/b', 'depth', 'seconds', 'share' (of the wall), 'count'}], each span after
    its parent, children in the order first entered."""
    wall = self.wall() if wall is None else wall
    order = list(self.spans)
    out = []

    def emit(parent):
      for path in order:
        if path[:-1] == parent:
          s, n = self.spans[path]
          out.append({"stage": "/".join(path), "depth": len(path) - 1, "seconds": s,
                      "share": s / wall if wall > 0 else 0.0, "count": n})
          emit(path)
    emit(())
    return out


@contextlib.contextmanager
def recording():
  """Records every span entered (in this thread) until the block ends; yields the Clock."""
  clock = Clock()
  token_c, token_p = _CLOCK.set(clock), _PATH.set(())
  try:
    yield clock
  finally:
    _CLOCK.reset(token_c)
    _PATH.reset(token_p)


@contextlib.contextmanager
def span(name: str):
  """Times the block as `name` under the enclosing span (nothing outside a recording). The
  time is recorded also when the block raises (a preempted stage shows what it took)."""
  clock = _CLOCK.get()
  if clock is None:
    yield
    return
  path = _PATH.get() + (str(name),)
  token = _PATH.set(path)
  t = time.perf_counter()
  try:
    yield
  finally:
    clock.add(path, time.perf_counter() - t)
    _PATH.reset(token)


def table_lines(rows, min_share: float = 0.005) -> list:
  """report.md's table: stage, seconds, share of the run's wall time; nested spans indented,
  those under `min_share` of the wall left out (their parent's time includes them)."""
  lines = ["| stage | seconds | share of wall | times |", "|---|---:|---:|---:|"]
  for r in rows:
    if r["depth"] and r["share"] < min_share:
      continue
    name = r["stage"].rsplit("/", 1)[-1]
    indent = "&nbsp;&nbsp;" * 2 * r["depth"]
    lines.append(f"| {indent}{name} | {r['seconds']:.1f} | {100 * r['share']:.1f}% | "
                 f"{r['count']} |")
  return lines
