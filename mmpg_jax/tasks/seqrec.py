"""Sequential recommendation: a user is a device, its last clicks its real-time data.

Device model: `models.seqrec.SeqRec` (SASRec or GRU4Rec encoders, static; the dynamic
classifier Dense-tanh-Dense on the user vector). Data: MovieLens-100K from RecBole's wheel,
preprocessed as the DUET/Persona line (`data/movielens.py`).

Roles of a device (one user at its evaluation target), as rows the generic code can score:
  `context`  the click window before the target: one sample whose `elements` [1, L, d] are
             the window's embedded clicks (the anchor elements a device uploads or summarises);
  `query`    the target's 1 + 99 candidates, one row each: `user` (the user vector of the
             window) [n, d], `item` [n, d], `label` [n] (1 = clicked), `weight` [n];
  `support`  the user's last labelled training positions (1 + 4 rows each) for on-device
             fine-tuning, `weight` 0 where the user has fewer positions.
No oracle role: the user's history is all the labelled data a user has.

Entries carry `window`: the time slice of the target among the split's users (sorted by the
target's timestamp, `data.time_windows` equal slices), so a stateful method (persona_dynamic)
sees users arrive in time order and refines its prototypes between slices.

Metrics per user (`rec_metrics` semantics, in JAX): uauc (the user's AUC: its positive against
its negatives, ties half; the selection metric), ndcg@{5,10,20}, hr@{5,10,20}, logloss; `auc`
is pooled over every row of every user (`pooled_metrics`: computed by the report from the rows'
scores, not a per-user mean).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmpg_jax import models
from mmpg_jax.core import rec_metrics
from mmpg_jax.core.config_errors import ConfigError, need
from mmpg_jax.data import movielens as ml
from mmpg_jax.data import pipeline, seqrec_text
from mmpg_jax.data import tfds_movielens as tml
from mmpg_jax.models import seqrec as seqrec_model
from mmpg_jax.tasks.base import Metric
from mmpg_jax.tasks.base import Task as _Base
from mmpg_jax.tasks.base import pad_to
from mmpg_jax.tasks.capabilities import Entropy, PooledMetrics

KS = (5, 10, 20)
# data.protocol: "cold_ood" (ours: `num_cold_users` users never seen by the cloud form the OOD
# group) or "official" (the official DUET/Persona scripts': every user warm, tested at its last
# click; we still choose on each user's validation target where the official code chooses on
# the test set)
PROTOCOLS = ("cold_ood", "official")


def _bce(scores, labels):
  return optax.sigmoid_binary_cross_entropy(scores, labels)


class Task(_Base, Entropy, PooledMetrics):
  name = "seqrec"
  datasets = ("movielens", "seqrec_text")      # data/movielens.py, data/seqrec_text.py
  metrics = ((Metric("uauc", percent=False, decimals=4), Metric("auc", percent=False, decimals=4))
             + tuple(Metric(f"ndcg@{k}", percent=False, decimals=4) for k in KS)
             + tuple(Metric(f"hr@{k}", percent=False, decimals=4) for k in KS)
             + (Metric("logloss", higher_is_better=False, percent=False, decimals=4),))
  encoder_prefixes = ("item_embed/", "pos_embed/", "seq_trans/", "target_in/", "target_out/",
                      "transformer/", "gru/", "generator/")
  anchor_modalities = ("clicks",)
  curve_metric = "ndcg@10"
  roles = ("context", "support", "query")
  oracle_role = None
  builders = (tml.MovielensCloud, tml.MovielensDevices)
  window_note = ("Mean {metric} over the users of each time slice (w0 the earliest targets): "
                 "a stateful method has refined its state on the slices before.")

  def __init__(self, config):
    super().__init__(config)
    self._bench = None
    self._enc = None                  # the jitted encoders of encode_split, made once

  # ---- model ---------------------------------------------------------------------------------
  def prepared(self):
    return tml.prepared(self.config.data)

  def build_model(self):
    return models.build(self.config.model, num_items=self.prepared().num_items,
                        window=self.config.data.window)

  def example_inputs(self, n):
    return (jnp.zeros((n, self.config.data.window), jnp.int32), jnp.ones((n,), jnp.int32))

  def init_params(self, model, seed):
    w, c = self.example_inputs(1)
    return model.init(jax.random.key(seed), w, c[:, None])["params"]

  def encode(self, model, params, window, item):
    """Rows: window [n, L], item [n] -> user vectors, item vectors, the windows' elements."""
    run = lambda m, *a: model.apply({"params": params}, *a, method=m)
    return {"user": run(model.encode_user, window),
            "item": run(model.encode_items, item[:, None])[:, 0],
            "elements": run(model.window_elements, window)}

  def example_labels(self, n):
    return {"label": jnp.zeros((n,), jnp.float32), "weight": jnp.ones((n,), jnp.float32)}

  # ---- data ----------------------------------------------------------------------------------
  def prepare_data(self):
    if self._bench is None:
      self._bench = pipeline.prepare(self.config.data, builders=self.builders)
    return self._bench

  def _encoders(self, model):
    if self._enc is None:
      self._enc = {
          "user": jax.jit(lambda p, w: model.apply({"params": p}, w, method=model.encode_user)),
          "item": jax.jit(lambda p, c: model.apply({"params": p}, c,
                                                   method=model.encode_items)),
          "elements": jax.jit(lambda p, w: model.apply({"params": p}, w,
                                                       method=model.window_elements))}
    return self._enc

  def _rows(self, model, params, window, candidates, label, weight, chunk=256):
    """Blocks of candidates sharing a window -> rows: window [B, L], candidates [B, n]."""
    enc = self._encoders(model)
    b, n = candidates.shape
    users, items = [], []
    for s in range(0, b, chunk):
      w, c = window[s:s + chunk], candidates[s:s + chunk]
      m = len(w)
      w, c = pad_to(w, chunk), pad_to(c, chunk)
      users.append(np.asarray(enc["user"](params, w))[:m])
      items.append(np.asarray(enc["item"](params, c))[:m])
    u, it = np.concatenate(users), np.concatenate(items)
    return {"user": np.repeat(u[:, None], n, axis=1), "item": it,
            "label": np.asarray(label, np.float32), "weight": np.asarray(weight, np.float32)}

  def check_items(self, ids, what: str) -> None:
    """Item ids must lie in 0..num_items (0 pads): an embedding lookup past the vocabulary
    would silently read a clamped row in JAX."""
    ids = np.asarray(ids)
    n = self.prepared().num_items
    if ids.size and (ids.min() < 0 or ids.max() > n):
        bad = ids[(ids < 0) | (ids > n)]
        raise ValueError(f"{what}: item id(s) {sorted(set(bad.tolist()))[:5]} outside the "
                         f"vocabulary 1..{n} (0 pads): the data was built with another item "
                         f"map; delete the prepared data folder and rerun")

  def encode_split(self, model, params, devices):
    t, s = devices["target"], devices["support"]
    for role, block in (("target", t), ("support", s)):
      self.check_items(block["window"], f"{role} click windows")
      self.check_items(block["candidates"], f"{role} candidates")
    nd = len(devices["user"])
    query = self._rows(model, params, t["window"], t["candidates"], t["label"],
                       np.ones_like(t["label"]))
    sp, sn = s["candidates"].shape[1:]
    sup = self._rows(model, params, s["window"].reshape(nd * sp, -1),
                     s["candidates"].reshape(nd * sp, sn), s["label"].reshape(nd * sp, sn),
                     np.repeat(s["mask"].reshape(nd * sp, 1), sn, axis=1))
    sup = {k: v.reshape((nd, sp * sn) + v.shape[2:]) for k, v in sup.items()}
    elements = np.asarray(self._encoders(model)["elements"](params, t["window"]))
    return {"context": {"elements": elements[:, None], "window": t["window"][:, None]},
            "query": query, "support": sup,
            "device_id": np.arange(nd, dtype=np.int32),
            "window": time_slices(devices["timestamp"], int(self.config.data.time_windows))}

  def global_loss(self, model, params, batch):
    scores = model.apply({"params": params}, batch["window"], batch["candidates"])
    loss = _bce(scores, batch["label"]).mean()
    # the share of positions whose clicked item outscores every sampled negative
    top = (scores[:, :1] > scores[:, 1:]).all(-1).mean()
    return loss, {"positive_first": top}

  # ---- the device side -----------------------------------------------------------------------
  def scores(self, model, params, feats):
    return model.apply({"params": params}, feats["user"], feats["item"],
                       method=model.score_rows)

  def metric_values(self, scores, feats):
    """One user's target: its candidates' scores [n] and labels [n] (one positive)."""
    y = feats["label"]
    pos = (scores * y).sum() / jnp.maximum(y.sum(), 1.0)
    neg = 1.0 - y
    # ties rank the negatives first; a non-finite positive score ranks last (NaN compares
    # False, which would otherwise give rank 1)
    above = jnp.where(jnp.isfinite(pos), ((scores >= pos) * neg).sum(), neg.sum())
    below = ((scores < pos) * neg).sum()
    ties = ((scores == pos) * neg).sum()
    rank = 1.0 + above
    out = {"uauc": (below + 0.5 * ties) / jnp.maximum(neg.sum(), 1.0),
           "logloss": _bce(scores, y).mean(),
           "_scores": scores, "_labels": y}
    for k in KS:
      hit = rank <= k
      out[f"hr@{k}"] = hit.astype(jnp.float32)
      out[f"ndcg@{k}"] = jnp.where(hit, 1.0 / jnp.log2(rank + 1.0), 0.0)
    return out

  # Pooled over every row of every user (report.build_results calls these).
  pooled_metrics = {"auc": lambda v: rec_metrics.auc(np.ravel(v["_scores"]),
                                                     np.ravel(v["_labels"]))}

  # The label-free check before swapping in an edit (deploy.rollback) reads the slate of
  # candidates the device is about to rank (never which one is clicked): its context holds
  # click embeddings only, no rows to score.
  check_role = "query"

  def entropy(self, model, params, feats):
    """Mean binary entropy of the click probabilities of a role's rows (no labels read)."""
    p = jax.nn.sigmoid(self.scores(model, params, feats))
    p = jnp.clip(p, 1e-7, 1.0 - 1e-7)
    return -(p * jnp.log(p) + (1.0 - p) * jnp.log1p(-p)).mean()

  def loss(self, model, params, feats):
    w = feats["weight"]
    return (_bce(self.scores(model, params, feats), feats["label"]) * w).sum() / jnp.maximum(
        w.sum(), 1.0)

  def anchor_elements(self, context):
    el = context["elements"]
    return {"clicks": el.reshape((-1, el.shape[-1]))}

  def anchor_info(self, cfg):
    return {"clicks_in_window": cfg.data.window}

  def report_notes(self, cfg):
    d = cfg.data
    protocol = []
    if d.protocol == "official":
      protocol = [
          "Protocol 'official' (as the official DUET/Persona scripts): every user is warm and "
          "tested at its last click; there is no cold (OOD) group. Every choice (training "
          "length, learning rates, grids) is made on each user's validation target, its "
          "second-to-last click, held out of training; the official code instead keeps the "
          "epoch that scores best on the test targets, so its figures are optimistic by that "
          "choice."]
    return protocol + [
        self.prepared().describe(d.to_dict()) + f" A device's real-time data is its last "
        f"{d.window} clicks.",
        f"Metrics per user over its 1 + {d.eval_negatives} candidates (uauc, ndcg, hr; ties "
        f"rank the negatives first), logloss per row, auc pooled over all rows. Users arrive "
        f"in {d.time_windows} time slices (by the target's time); a stateful method refines "
        f"its state between slices."]

  # ---- meta-training (cloud only): the warm users' training positions ------------------------
  def meta_data_version(self):
    return [ml.GENERATOR_VERSION, ml.WHEEL_VERSION]

  def meta_devices(self, indices, query_size, context_size=None):
    """Meta device i: training position order[i] (a seeded permutation of the cloud's
    positions, so the first N are spread over users): its click window as the context, its
    1 + train_negatives candidates as the labelled query (`query_size` and `context_size` do
    not apply)."""
    src = self.prepare_data().global_source()
    order = np.random.default_rng([int(self.config.data.seed), 5]).permutation(len(src))
    ex = [src[int(order[int(i) % len(src)])] for i in indices]
    w = np.stack([e["window"] for e in ex])
    return {"window": w, "candidates": np.stack([e["candidates"] for e in ex]),
            "label": np.stack([e["label"] for e in ex]).astype(np.float32),
            "device_id": np.asarray(indices, np.int32)}

  def encode_meta(self, model, params, raw):
    run = lambda m, *a: model.apply({"params": params}, *a, method=m)
    u = run(model.encode_user, raw["window"])                         # [B, d]
    items = run(model.encode_items, raw["candidates"])                # [B, n, d]
    n = raw["candidates"].shape[1]
    return {"context": {"elements": run(model.window_elements, raw["window"])[:, None]},
            "query": {"user": jnp.repeat(u[:, None], n, axis=1), "item": items,
                      "label": raw["label"], "weight": jnp.ones_like(raw["label"])}}

  def meta_loss(self, model, params, query):
    s = self.scores(model, params, query)
    return _bce(s, query["label"]).mean(), self.metric_values(s, query)["uauc"]

  # ---- checks --------------------------------------------------------------------------------
  def validate_config(self, cfg):
    d = cfg.data
    need(d.protocol in PROTOCOLS, "data.protocol", d.protocol,
         "'cold_ood' (cold users held out as the OOD group) or 'official' (every user warm)")
    need(cfg.model.get("classifier_form", "dense") in seqrec_model.CLASSIFIER_FORMS,
         "model.classifier_form", cfg.model.get("classifier_form"),
         "expected 'dense' (the classifier a method edits) or 'generated' (the official DUET "
         "model, its classifier generated per click window)")
    if d.protocol == "official":
      need(d.num_cold_users == 0, "data.num_cold_users", d.num_cold_users,
           "0 under data.protocol='official' (every user warm); "
           "--config=configs/seqrec_movielens.py:official sets it and the device counts")
    for key in ("window", "train_negatives", "eval_negatives", "support_positions",
                "time_windows", "min_interactions"):
      need(isinstance(d[key], int) and d[key] >= 1, f"data.{key}", d[key],
           "a positive integer")
    need(d.min_interactions >= 5, "data.min_interactions", d.min_interactions,
         "at least 5: two clicks of history, a training, a validation and a test target")
    try:
      f = self.prepared().figures(d)
    except (ml.SourceError, seqrec_text.FormatError) as e:
      raise ConfigError(f"config.data (name {d.name!r}): {e}") from e
    for key, want in (("num_val_devices", f["validation_users"]),
                      ("num_test_devices", f["test_users"]),
                      ("num_ood_devices", f["test_ood_users"]),
                      ("num_global_devices", f["warm_users"])):
      need(d[key] == want, f"data.{key}", d[key],
           f"the preprocessing gives {want} (users are the devices; set it to {want})")
    need(d.context_size == 1, "data.context_size", d.context_size,
         "a device's context is its one click window (set 1)")
    for key in ("fda.meta_devices", "persona.meta_devices"):
      section, name = key.split(".")
      n = cfg[section][name]
      need(n <= f["training_positions"], key, n,
           f"at most the {f['training_positions']} training positions meta devices are drawn "
           f"from (a meta device is one position)")
    rows = d.support_positions * (1 + d.train_negatives)
    need(d.support_size == rows, "data.support_size", d.support_size,
         f"support_positions x (1 + train_negatives) = {rows} labelled rows")


def time_slices(timestamps, w: int) -> np.ndarray:
  """Each entry's slice 0..w-1 by the rank of its timestamp (equal-size slices, ties by
  order)."""
  ts = np.asarray(timestamps)
  rank = np.empty(len(ts), np.int64)
  rank[np.argsort(ts, kind="stable")] = np.arange(len(ts))
  return (rank * w // max(len(ts), 1)).astype(np.int32)
