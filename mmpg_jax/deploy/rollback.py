"""Label-free rollback: before a device swaps in an edit it checks, on its own recent unlabelled
data, whether the edit is likely to hurt, and keeps the model it has where the check says so.

The check: the edited model's prediction entropy on the device's check role (its unlabelled
context; for a ranking task the slate of candidates it is about to rank, without knowing which
is clicked) minus the unedited model's. An edit that moves the model off the data it is meant
for makes it less sure of that data: entropy minimisation is the signal TENT adapts with, here
used only to accept or refuse. One forward pass of each model on data the device holds; no
labels, no backward pass. The threshold is chosen on validation devices (the largest mean
selection metric after rollback, "never roll back" among the choices); labels are read only to
score the check (which devices the edit really harmed).
"""
import jax
import numpy as np

QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


def check_role(task) -> str:
  return getattr(task, "check_role", task.context_role)


def score_fn(task, model, method, hp):
  """(params, device) -> entropy(edited) - entropy(unedited) on the check role."""
  role = check_role(task)

  def one(params, dev):
    edited = method.adapt(params, dev, hp)
    return task.entropy(model, edited, dev[role]) - task.entropy(model, params, dev[role])
  return one


def scorer(evaluator, method, hp):
  """feats -> [n] the check's score of every entry of a split (label-free); compiled once."""
  task = evaluator.task
  fn = jax.jit(jax.vmap(score_fn(task, evaluator.model, method, hp), in_axes=(None, 0)))
  roles = set(method.uses) | {check_role(task)}
  return lambda params, feats: np.asarray(evaluator.chunked(
      lambda p: fn(params, p), evaluator.sub(roles, feats)))


def thresholds(val_scores) -> list:
  """The candidate thresholds: never (inf), any rise (0), and quantiles of the validation
  scores (roll back the most suspicious 50%, ..., 2%)."""
  q = np.quantile(val_scores, QUANTILES) if len(val_scores) else []
  return [float("inf"), 0.0] + sorted({float(x) for x in q})


def choose(val_scores, val_edited, val_base) -> float:
  """The threshold with the best mean metric on validation (higher is better; ties: the
  fewest rollbacks, i.e. the largest threshold)."""
  best = None
  for th in thresholds(val_scores):
    m = float(np.mean(np.where(val_scores > th, val_base, val_edited)))
    if best is None or m > best[0] + 1e-12 or (abs(m - best[0]) <= 1e-12 and th > best[1]):
      best = (m, th)
  return best[1]


def summary(scores_, edited, base, threshold: float) -> dict:
  """Per group: harmed share before/after, the metric before/after/unedited, the share rolled
  back and the check's precision and recall at spotting harmful edits (labels read here only
  to score the check). Metrics higher-is-better."""
  back = scores_ > threshold
  after = np.where(back, base, edited)
  harmed = edited < base
  tp = float((back & harmed).sum())
  return {"harmed_before": float(harmed.mean()), "harmed_after": float((after < base).mean()),
          "metric_edited": float(edited.mean()), "metric_after": float(after.mean()),
          "metric_unedited": float(base.mean()), "rolled_back": float(back.mean()),
          "precision": tp / back.sum() if back.any() else float("nan"),
          "recall": tp / harmed.sum() if harmed.any() else float("nan"),
          "devices": int(len(edited))}
