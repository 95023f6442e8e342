"""The one plotting helper: every PNG of a report is drawn inside `figure`, which sets the
non-interactive backend, lays the axes out, saves at one resolution and always closes."""
import contextlib


@contextlib.contextmanager
def figure(path: str, nrows: int = 1, ncols: int = 1, figsize=(7, 4.5), **subplots):
  """Yields (fig, axes), axes a [nrows, ncols] array; on leaving, a tight layout saved to
  `path` at 100 dpi. The figure is closed even if drawing fails (nothing is saved then)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **subplots)
  try:
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)
