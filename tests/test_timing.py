"""The run's time table: nested spans, repeated spans summed, nothing outside a recording."""
import time

import pytest

from mmpg_jax.core import timing


def test_spans_nest_sum_and_share_the_wall():
  with timing.recording() as clock:
    with timing.span("family"):
      for _ in range(2):
        with timing.span("stage"):
          time.sleep(0.01)
    with timing.span("evaluation"):
      pass
  rows = clock.rows(wall=1.0)
  assert [(r["stage"], r["depth"], r["count"]) for r in rows] == [
      ("family", 0, 1), ("family/stage", 1, 2), ("evaluation", 0, 1)]
  assert rows[0]["seconds"] >= rows[1]["seconds"] >= 0.02
  assert rows[1]["share"] == pytest.approx(rows[1]["seconds"])
  table = timing.table_lines(rows)
  assert table[0].startswith("| stage | seconds | share of wall")
  assert len(table) == 2 + 3


def test_a_span_outside_a_recording_records_nothing_and_a_raising_block_is_timed():
  with timing.span("alone"):
    pass
  with timing.recording() as clock:
    with pytest.raises(RuntimeError):
      with timing.span("preempted"):
        raise RuntimeError("stop")
  assert [r["stage"] for r in clock.rows()] == ["preempted"]
  assert "alone" not in {r["stage"] for r in clock.rows()}
