"""Recommendation metrics as the DUET/Persona code computes them (docs/methods.md,
`util/new_metrics.py`), on per-user candidate blocks: scores [U, n], labels [U, n] (1 = the
clicked item).

* `auc`: one AUC over every row of every user (pooled).
* `uauc`: the mean per-user AUC over users that have both classes.
* `logloss`: mean binary cross-entropy of sigmoid(score).
* `ndcg@k`, `hr@k`: per user, candidates ranked by score; IDCG uses the number of positives.
A non-finite score ranks last. Ties count against the positive (a negative scored equal to it ranks above it), so a constant
scorer gets the worst rank, not the best: the official code sorts and, with the positive stored
first, would rank it first.

AUC is the Mann-Whitney statistic with ties counted half.
"""
import numpy as np


def auc(scores, labels) -> float:
  """AUC of one set of scored rows (the pooled `auc` over all users' rows, or one user's)."""
  pos, neg = scores[labels > 0], scores[labels <= 0]
  if len(pos) == 0 or len(neg) == 0:
    return float("nan")
  order = np.argsort(np.concatenate([pos, neg]), kind="stable")
  allv = np.concatenate([pos, neg])[order]
  ranks = np.empty(len(allv))
  # average ranks over ties
  _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
  cum = np.cumsum(counts)
  avg = cum - (counts - 1) / 2.0
  ranks[order] = avg[inv]
  r_pos = ranks[:len(pos)].sum()
  return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def user_auc(scores, labels) -> np.ndarray:
  """[U] per-user AUC (nan where a user lacks a class)."""
  return np.asarray([auc(s, l) for s, l in zip(np.asarray(scores), np.asarray(labels))])


def ranking(scores, labels, ks=(5, 10, 20)) -> dict:
  """{'ndcg@k', 'hr@k': [U]} per user; ties rank the negatives first."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  out = {}
  # rank of each positive: 1 + the candidates scored at least as high, other than itself
  above = (scores[:, None, :] >= scores[:, :, None]).sum(-1) - 1        # [U, n]
  n = scores.shape[1]
  # a non-finite score ranks last (NaN compares False, which would rank it first)
  above = np.where(np.isfinite(scores), above, n - 1)
  rank = np.where(labels > 0, above + 1, np.inf)
  npos = (labels > 0).sum(-1)
  for k in ks:
    hit = rank <= k
    dcg = np.where(hit, 1.0 / np.log2(rank + 1), 0.0).sum(-1)
    idcg = np.asarray([(1.0 / np.log2(np.arange(2, min(p, k) + 2))).sum() for p in npos])
    out[f"ndcg@{k}"] = np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 0.0)
    out[f"hr@{k}"] = (hit.sum(-1) > 0).astype(np.float64)
  return out


def logloss(scores, labels) -> float:
  s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
  # log(1 + e^-|s|) + max(s, 0) - y s: stable binary cross-entropy with logits
  return float(np.mean(np.log1p(np.exp(-np.abs(s))) + np.maximum(s, 0) - y * s))


def all_metrics(scores, labels, ks=(5, 10, 20)) -> dict:
  """Every metric of the module docstring, averaged over users (pooled for auc/logloss)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  ua = user_auc(scores, labels)
  out = {"auc": auc(scores.ravel(), labels.ravel()),
         "uauc": float(np.nanmean(ua)) if np.isfinite(ua).any() else float("nan"),
         "logloss": logloss(scores, labels)}
  out.update({k: float(v.mean()) for k, v in ranking(scores, labels, ks).items()})
  return out
