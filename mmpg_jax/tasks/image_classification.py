"""Image classification under real-time device shift: drifting digits.

Device model: `models.digit_cnn.DigitClassifier` (static CNN encoder; dynamic classifier:
LayerNorm -> Dense `hidden` -> ReLU -> Dense `out`). Data: `data/drifting_digits.py`, each device
a stream of W windows whose shift drifts from one window to the next.

A *window* is what every method adapts to: `encode_split` lays a split out as one entry per
(device, window), with `device_id` and `window` (the position in the stream) beside the roles,
so the generic evaluator adapts each method once per window and the report can average by
window position. Within an entry the roles are the window's: `context` (its recent unlabelled
images: the real-time data a device uploads or summarises), `support`, `query`, `oracle`; each
holds the image embeddings `emb` [n, D] and, where labelled, `label`. One label group (the 10
digits); anchor elements are the context's image embeddings.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmpg_jax import models
from mmpg_jax.core.config_errors import need
from mmpg_jax.data import drifting_digits as dd
from mmpg_jax.data import pipeline
from mmpg_jax.data import tfds_drifting_digits as tdd
from mmpg_jax.data import tfds_moving_digits as tmd
from mmpg_jax.tasks.base import Metric
from mmpg_jax.tasks.base import Task as _Base
from mmpg_jax.tasks.base import encode_roles, stack
from mmpg_jax.tasks.capabilities import KnownLabelPrior, LinearHead, ScoredContext, ShiftedMetaData


def flatten_windows(devices: dict) -> dict:
  """A split stacked by device (roles [N, W, n, ...]) -> one entry per (device, window):
  roles [N*W, n, ...], `device_id` and `window` [N*W], device-major (d0w0, d0w1, ...)."""
  nd = len(devices["device_id"])
  w = int(devices["shift"]["jumped"].shape[1])
  out = {role: {k: np.asarray(v).reshape((nd * w,) + v.shape[2:]) for k, v in data.items()}
         for role, data in devices.items() if isinstance(data, dict) and "image" in data}
  out["device_id"] = np.repeat(np.asarray(devices["device_id"]), w)
  out["window"] = np.tile(np.arange(w, dtype=np.int32), nd)
  out["jumped"] = np.asarray(devices["shift"]["jumped"]).reshape(-1)
  return out


class Task(_Base, KnownLabelPrior, LinearHead, ScoredContext, ShiftedMetaData):
  name = "image_classification"
  datasets = ("drifting_digits",)
  metrics = (Metric("accuracy"),)
  label_groups = ((0, dd.NUM_CLASSES),)
  label_bias_leaf = "classifier/out/bias"
  classifier_layer = "classifier/out"     # scores = classifier_features @ kernel + bias
  encoder_prefixes = ("encoder/",)
  anchor_modalities = ("image",)
  builders = (tdd.DriftingDigitsCloud, tdd.DriftingDigitsDevices)   # TFDS: cloud, devices

  def build_model(self):
    return models.build(self.config.model, num_classes=dd.NUM_CLASSES)

  def example_inputs(self, n):
    s = self.config.data.size
    return (jnp.zeros((n, s, s), jnp.uint8),)

  def encode(self, model, params, image):
    return {"emb": model.apply({"params": params}, image, method=model.encode_images)}

  def example_labels(self, n):
    return {"label": jnp.zeros((n,), jnp.int32)}

  # ---- data ----------------------------------------------------------------------------------
  def prepare_data(self):
    return pipeline.prepare(self.config.data, builders=self.builders)

  def encode_split(self, model, params, devices, chunk: int = 1024):
    enc = jax.jit(lambda p, x: self.encode(model, p, x))
    flat = flatten_windows(devices)
    out = encode_roles(enc, params, flat, ("image",), ("label",), chunk)
    out["window"], out["jumped"] = flat["window"], flat["jumped"]
    return out

  def global_loss(self, model, params, batch):
    logits = model.apply({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}

  def source_prior(self, data, max_examples: int = 8192):
    """Frequency of each digit in the cloud's training images, add-one smoothed."""
    src = data.global_source()
    idx = np.linspace(0, len(src) - 1, min(len(src), max_examples)).astype(int)
    labels = np.array([int(src[int(i)]["label"]) for i in idx])
    counts = np.bincount(labels, minlength=dd.NUM_CLASSES) + 1.0
    return (counts / counts.sum()).astype(np.float32)

  # ---- the device side -----------------------------------------------------------------------
  def scores(self, model, params, feats):
    return model.apply({"params": params}, feats["emb"], method=model.classify_from_features)

  def metric_values(self, scores, feats):
    return {"accuracy": (scores.argmax(-1) == feats["label"]).mean()}

  def loss(self, model, params, feats):
    return optax.softmax_cross_entropy_with_integer_labels(
        self.scores(model, params, feats), feats["label"]).mean()

  def entropy(self, model, params, feats):
    lp = jax.nn.log_softmax(self.scores(model, params, feats))
    return -(jnp.exp(lp) * lp).sum(-1).mean()

  def classifier_features(self, model, params, feats):
    return model.apply({"params": params}, feats["emb"], method=model.classifier_features)

  def label_posteriors(self, model, params, dev):
    return jax.nn.softmax(self.scores(model, params, dev["context"]))[:, None, :]

  def asked_posteriors(self, model, params, dev):
    return jax.nn.softmax(self.scores(model, params, dev["context"]))

  def anchor_elements(self, context):
    return {"image": context["emb"]}

  def anchor_info(self, cfg):
    return {"images_in_window": cfg.data.context_size}

  def query_label_prior(self, dev):
    counts = jax.nn.one_hot(dev["query"]["label"], dd.NUM_CLASSES).sum(0)
    return counts / jnp.maximum(counts.sum(), 1.0)

  def element_labels(self, dev):
    return dev["context"]["label"][:, None]

  def report_notes(self, cfg):
    d = cfg.data.drift
    return [f"Each device is a stream of {d.windows} windows whose shift drifts (label-prior "
            f"rate {d.label_rate}, rotation step {d.rotation_step}°, jump probability "
            f"{d.jump_prob}); every method adapts once per window, from that window's data "
            f"only unless it says otherwise. A test entry is one (device, window): means are "
            f"over {cfg.data.num_test_devices} devices × {d.windows} windows."]

  # ---- meta-training -------------------------------------------------------------------------
  def meta_devices(self, indices, query_size, context_size=None):
    cfg = pipeline_cfg(self.config.data)
    roles = {"context": context_size or cfg["context_size"], "query": query_size}
    return stack([dd.meta_window(cfg, int(i), roles) for i in indices])

  def meta_data_version(self):
    return dd.GENERATOR_VERSION

  def meta_windows_per_stream(self) -> int:
    return int(self.config.data.drift.windows)          # dd.meta_window's layout

  def encode_meta(self, model, params, raw):
    enc = lambda x: model.apply({"params": params}, x, method=model.encode_images)
    return {r: {"emb": enc(raw[r]["image"]), "label": raw[r]["label"]}
            for r in ("context", "query")}

  def meta_loss(self, model, params, query):
    logits = self.scores(model, params, query)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, query["label"]).mean()
    return loss, (logits.argmax(-1) == query["label"]).mean()

  # ---- checks --------------------------------------------------------------------------------
  def validate_config(self, cfg):
    d = cfg.data
    for key in ("context_size", "query_size", "oracle_size"):
      need(d[key] >= 1, f"data.{key}", d[key], "a window needs at least one image per role "
           "(the context is what a device adapts from)")
    need(d.size >= 20, "data.size", d.size, "the 20x20 digit box must fit in the canvas")
    need(0 <= d.jitter <= (d.size - 20) // 2, "data.jitter", d.jitter,
         f"between 0 and (data.size - 20) // 2 = {(d.size - 20) // 2}")
    dr = d.drift
    need(isinstance(dr.windows, int) and dr.windows >= 1, "data.drift.windows", dr.windows,
         "a stream has at least one window")
    for key in ("jump_prob", "label_rate", "thickness_prob"):
      need(0.0 <= dr[key] <= 1.0, f"data.drift.{key}", dr[key], "a probability or rate in [0, 1]")
    for key in ("rotation_step", "noise_step", "blur_step", "clutter_strength_step"):
      need(dr[key] >= 0.0, f"data.drift.{key}", dr[key], "a step size >= 0")
    pipeline.check_held_out_families(d)

  def resolve_meta_data(self, overrides):
    return pipeline.resolve_widen(self.config.data, overrides)

  def check_meta_data(self, overrides):
    need("meta_wide" not in overrides, "cdc_robust.variants", "wide_mix",
         "drifting digits draws meta streams from one shift distribution (no mixture); use "
         "'wide'")
    pipeline.check_meta_shift(self.config.data, overrides)


def pipeline_cfg(data_cfg) -> dict:
  """The data config as the generator reads it (plain dicts, as the TFDS builders see it)."""
  return tmd.data_config_dict(data_cfg)
