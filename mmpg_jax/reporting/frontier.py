"""The accuracy-cost frontier: which methods no other method beats on both cost and accuracy.

A point (cost, accuracy) is *dominated* when another point costs no more and is no less
accurate, and is strictly better in one of the two; the Pareto frontier is every point that is
not. Costs are lower-is-better; the accuracy's direction is the selection metric's.
"""
import numpy as np


def pareto(costs, values, higher_is_better: bool = True) -> np.ndarray:
  """[n] bool: the points on the frontier. Non-finite points are never on it (nor dominate)."""
  c = np.asarray(costs, np.float64)
  v = np.asarray(values, np.float64) * (1.0 if higher_is_better else -1.0)
  ok = np.isfinite(c) & np.isfinite(v)
  on = ok.copy()
  for i in np.flatnonzero(ok):
    others = ok & (c <= c[i]) & (v >= v[i]) & ((c < c[i]) | (v > v[i]))
    on[i] = not others.any()
  return on


def frontier(points: dict, higher_is_better: bool = True) -> list:
  """{method: (cost, value)} -> [{method, cost, value, pareto}] sorted by cost."""
  names = sorted(points, key=lambda n: (points[n][0], n))
  on = pareto([points[n][0] for n in names], [points[n][1] for n in names], higher_is_better)
  return [{"method": n, "cost": float(points[n][0]), "value": float(points[n][1]),
           "pareto": bool(o)} for n, o in zip(names, on)]
