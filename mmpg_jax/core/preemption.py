"""SIGTERM (how Cloud TPU and most schedulers preempt) -> checkpoint now, then exit.

`install()` makes SIGTERM set a flag instead of killing the process; the training loops call
`requested()` after every step, save a checkpoint of the step they just finished and raise
`Preempted`. SIGKILL cannot be caught: a run killed that way resumes from its last periodic
checkpoint, and because batches and RNG are functions of the step it still ends with the
same parameters.
"""
import signal

_REQUESTED = False


class Preempted(SystemExit):
  """Raised after the final checkpoint of a preempted run; exit status 143 (128 + SIGTERM)."""

  def __init__(self, message):
    super().__init__(143)
    self.message = message

  def __str__(self):
    return self.message


def _handler(signum, frame):
  del signum, frame
  global _REQUESTED
  _REQUESTED = True


def install():
  signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
  return _REQUESTED


def reset():
  global _REQUESTED
  _REQUESTED = False
