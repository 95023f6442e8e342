"""Label-free rollback: before a device swaps in an edit it checks, on its own recent unlabelled
data, whether the edit is likely to hurt, and keeps the model it has where the check says so.

Two checks, each one forward pass of the edited and of the current model on the device's
check role (its unlabelled context; for a ranking task the slate of candidates it is about to
rank, without knowing which is clicked):
- `entropy_rise`: the edited model's mean prediction entropy minus the current model's. An
  edit made for other data moves the model off the data it is meant for and makes it less sure
  of it: the signal TENT adapts with, here only used to accept or refuse (tasks with
  `entropy`).
- `disagreement`: the share of the role's rows whose top prediction the edit changes. An edit
  that overturns most of what the model predicted on the device's own data is a large, blind
  change; a small one cannot hurt much (any task: it reads `scores`).
The check and its threshold are chosen together on validation devices: the largest mean
selection metric after rollback, "never roll back" among the choices. Labels are read only to
score the checks (which devices the edit really harmed; precision, recall and the AUROC of
each check's score at spotting them).
"""
import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.core import rec_metrics
from mmpg_jax.tasks.capabilities import Entropy

QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
NEVER = "never"


def check_role(task) -> str:
  """The role whose rows the checks score: an Entropy task says; else the context."""
  return task.check_role if isinstance(task, Entropy) else task.context_role


def checks(task) -> tuple:
  return (("entropy_rise",) if isinstance(task, Entropy) else ()) + ("disagreement",)


def score_fn(task, model, method, hp):
  """(params, device) -> {check: score}, higher = more suspicious; one edit, forward only."""
  role = check_role(task)
  names = checks(task)

  def one(params, dev):
    edited = method.adapt(params, dev, hp)
    feats = dev[role]
    out = {}
    if "entropy_rise" in names:
      out["entropy_rise"] = (task.entropy(model, edited, feats)
                             - task.entropy(model, params, feats))
    top = lambda p: jnp.argmax(task.scores(model, p, feats), -1)
    out["disagreement"] = jnp.mean((top(edited) != top(params)).astype(jnp.float32))
    return out
  return one


def scorer(evaluator, method, hp):
  """feats -> {check: [n]} scores of every entry of a split (label-free); compiled once."""
  task = evaluator.task
  fn = jax.jit(jax.vmap(score_fn(task, evaluator.model, method, hp), in_axes=(None, 0)))
  roles = set(method.uses) | {check_role(task)}
  return lambda params, feats: {k: np.asarray(v) for k, v in evaluator.chunked(
      lambda p: fn(params, p), evaluator.sub(roles, feats)).items()}


def thresholds(val_scores) -> list:
  """A check's candidate thresholds: any rise (0) and quantiles of its validation scores (roll
  back the most suspicious 50%, ..., 2%)."""
  q = np.quantile(val_scores, QUANTILES) if len(val_scores) else []
  return [0.0] + sorted({float(x) for x in q})


def choose(val_scores: dict, val_edited, val_base):
  """(check, threshold) with the best mean metric on validation (higher is better); ties go to
  the fewest rollbacks. (NEVER, inf) when no check beats keeping every edit."""
  key = lambda c: (round(c[0], 12), c[1])       # the metric, then the fewest rollbacks
  best = (float(np.mean(val_edited)), 0.0, NEVER, float("inf"))
  for check, s in val_scores.items():
    for th in thresholds(s):
      back = s > th
      cand = (float(np.mean(np.where(back, val_base, val_edited))), -float(back.mean()),
              check, th)
      if key(cand) > key(best):
        best = cand
  return best[2], best[3]


def summary(scores: dict, edited, base, check: str, threshold: float) -> dict:
  """One group: harmed share before/after, the metric before/after/unedited, the share rolled
  back, the chosen check's precision and recall at spotting harmful edits, and every check's
  AUROC (labels read here only to score the checks). Metrics higher-is-better."""
  back = (scores[check] > threshold) if check != NEVER else np.zeros(len(edited), bool)
  after = np.where(back, base, edited)
  harmed = edited < base
  tp = float((back & harmed).sum())
  return {"harmed_before": float(harmed.mean()), "harmed_after": float((after < base).mean()),
          "metric_edited": float(edited.mean()), "metric_after": float(after.mean()),
          "metric_unedited": float(base.mean()), "rolled_back": float(back.mean()),
          "precision": tp / back.sum() if back.any() else float("nan"),
          "recall": tp / harmed.sum() if harmed.any() else float("nan"),
          "auroc": {k: rec_metrics.auc(np.asarray(s, np.float64), harmed.astype(np.float64))
                    for k, s in scores.items()},
          "devices": int(len(edited))}
