"""Persona's prototypes over time: refining the centres as windows arrive (population and
device scope), and the cloud state a stream of windows is served with."""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmpg_jax.core.kmeans import sqdist as _sqdist


def median_spacing(centres) -> float:
  d = np.sqrt(np.asarray(_sqdist(centres, centres)))
  return float(np.median(d[~np.eye(len(d), dtype=bool)])) if len(d) > 1 else 1.0


def refine(state, codes, assign, rate, merge_distance):
  """One time step of the dynamic prototypes (module docstring): state {'centres' [K, C],
  'population' [K]}, the step's windows' Stage-A codes [M, C] and prototypes [M]."""
  c, pop = state["centres"], state["population"]
  k = c.shape[0]
  onehot = jax.nn.one_hot(assign, k)
  count = onehot.sum(0)
  mean = onehot.T @ codes / jnp.maximum(count, 1.0)[:, None]
  c = jnp.where(count[:, None] > 0, c + rate * (mean - c), c)
  pop = (1 - rate) * pop + rate * count / jnp.maximum(count.sum(), 1.0)
  # Merge the closest pair if too close; the freed slot splits the most spread-out other
  # prototype half-way towards its farthest window. Merge and split go together (K stays
  # fixed), so a merge waits until a split is possible: another prototype (K >= 3) with two
  # or more windows this step whose new centre lies farther than the merge distance from its
  # source (no merge-split cycling).
  d = jnp.sqrt(_sqdist(c, c)) + jnp.where(jnp.eye(k, dtype=bool), jnp.inf, 0.0)
  flat = jnp.argmin(d)
  i, j = flat // k, flat % k
  dist_to = jnp.sqrt(((codes - c[assign]) ** 2).sum(-1))                 # [M]
  spread = onehot.T @ dist_to / jnp.maximum(count, 1.0)
  others = (jnp.arange(k) != i) & (jnp.arange(k) != j)
  s = jnp.argmax(jnp.where(others, spread, -jnp.inf))
  far = codes[jnp.argmax(jnp.where(assign == s, dist_to, -jnp.inf))]
  half = 0.5 * (c[s] + far)
  wi, wj = pop[i], pop[j]
  merged = jnp.where(wi + wj > 0, (wi * c[i] + wj * c[j]) / jnp.maximum(wi + wj, 1e-12),
                     0.5 * (c[i] + c[j]))
  c_m = c.at[i].set(merged).at[j].set(half)
  pop_m = pop.at[i].set(wi + wj).at[j].set(0.5 * pop[s]).at[s].set(0.5 * pop[s])
  do = ((d[i, j] < merge_distance) & others[s] & (count[s] > 1)
        & (jnp.sqrt(((half - c[s]) ** 2).sum()) > merge_distance))
  return {"centres": jnp.where(do, c_m, c), "population": jnp.where(do, pop_m, pop),
          "merges": state["merges"] + do.astype(jnp.int32)}


def history_centres(codes, labels, centres, windows: int, rate: float):
  """The centre device-scope refinement serves each meta window with: meta ids come in streams
  of `windows` consecutive windows (`task.meta_windows_per_stream`); each stream is replayed
  through `refine_personal` in time order with assignments `labels`. Returns [N, C]: window i's
  centre before its own code is seen (a stream's first window: its prototype's centre)."""
  n, c = codes.shape
  streams = -(-n // windows)
  pad = streams * windows - n                    # a partial last stream: padded, then dropped
  codes_s = jnp.pad(codes, ((0, pad), (0, 0))).reshape(streams, windows, c)
  labels_s = jnp.pad(labels, (0, pad)).reshape(streams, windows)
  ids = jnp.arange(streams)

  def step(state, t):
    g, code = labels_s[:, t], codes_s[:, t]
    centre = jnp.where((state["owner"] == g)[:, None], state["personal"], centres[g])
    return refine_personal(state, centre, code, ids, g, rate), centre

  state = {"personal": jnp.zeros((streams, c), codes.dtype),
           "owner": jnp.full((streams,), -1, jnp.int32)}
  _, served = jax.lax.scan(step, state, jnp.arange(windows))      # [W, streams, C]
  return jnp.swapaxes(served, 0, 1).reshape(-1, c)[:n]


def refine_personal(state, centre, code, device, assign, rate):
  """Scope "device": each served device's own copy of its prototype's centre moves towards
  its window's code, c_d <- c_d + rate (code - c_d); a device assigned to another prototype
  starts a new copy from that prototype's centre (adapt reads `owner`)."""
  moved = centre + rate * (code - centre)
  return dict(state, personal=state["personal"].at[device].set(moved),
              owner=state["owner"].at[device].set(assign))


# ---- stateful methods: what the evaluator runs in time order -----------------------------------

@dataclasses.dataclass(frozen=True)
class Stream:
  """A method whose cloud keeps state across time (`evaluate.Evaluator` serves every entry of
  window position t with the state, then `refine`s it with what those entries reported)."""
  init: Callable                     # (hp, the split's device ids) -> state
  adapt: Callable                    # (params, dev, hp, state) -> (params, report)
  refine: Callable                   # (state, reports stacked over the step's entries, hp)


# ---- the family ----------------------------------------------------------------------------------
