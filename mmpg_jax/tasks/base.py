"""The core task interface: everything specific to one task that every method needs.

A *task* owns its device model, its data, its supervised and unsupervised losses, its metrics,
what a device's unlabelled context contributes as anchor elements, and (where it has them) its
label groups. The main job, the evaluator, the baselines, the stage loop, meta-training, costs,
the report, generation and the benchmarks are written once against this class and never import
a benchmark's constants.

Data a task hands to the generic code:
  * `prepare_data()` -> an object with `global_batches(batch_size, seed)` (batch i a function of
    (seed, i)) and `devices(split)` (a split's raw devices stacked over a leading device axis);
  * `encode_split(model, params, devices)` -> a device pytree: `{role: {field: [N, n, ...]},
    'device_id': [N], ...}` where each role holds features of the static encoders; every leaf
    has the device axis first, so the evaluator can vmap and chunk it without knowing the
    fields;
  * `meta_devices(indices)` / `encode_meta(model, params, raw)`: fresh, fully labelled
    (cloud-side) meta-training devices for hypernetwork meta-training.

Device-side functions take one device's features (no device axis) and are pure, so the
generic code can jit and vmap them. What only some tasks can do (label groups, a linear head,
gallery ranking, an entropy, pooled metrics, shifted meta data) is a declared capability in
capabilities.py, tested with isinstance.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str
  higher_is_better: bool = True
  percent: bool = True          # a rate in [0, 1], reported in %; False: reported as is
  decimals: int = 2             # digits the report shows


class Task:
  """Base class: a subclass fills in what its task owns. See video_qa.py for a full one."""

  name = ""
  datasets = ()                 # data.name values the task can read
  # The first metric is the selection metric (hyper-parameters, FDA steps, 'margin closed').
  metrics = (Metric("accuracy"),)
  # Label groups ((lo, hi), ...): non-empty exactly for a `capabilities.LabelGroups` task (the
  # FDA's anchor EM runs over them); empty: the task has no labels to re-weight.
  label_groups = ()
  label_bias_leaf = None        # the leaf a label-shift correction edits (LabelGroups tasks)
  encoder_prefixes = ()         # leaves of the static encoders (their outputs are cached)
  # Keys of `anchor_elements`, primary first. Explicit because JAX pytrees sort dict keys.
  anchor_modalities = ("video",)
  roles = ("context", "support", "query", "oracle")
  support_role, oracle_role, context_role, query_role = "support", "oracle", "context", "query"

  # A second metric the report plots beside the selection metric on validation curves
  curve_metric = None
  # What report.md says above its per-window table (tasks whose entries carry `window`).
  window_note = ("Mean {metric} over devices at each position of their streams (window 0 "
                 "first; each window's shift is a drift step, or a jump, from the last).")

  def __init__(self, config):
    self.config = config

  # ---- model ---------------------------------------------------------------------------------
  def build_model(self):
    raise NotImplementedError

  def example_inputs(self, n: int) -> tuple:
    """Raw model inputs for n samples (zeros): for init and the cost model."""
    raise NotImplementedError

  def init_params(self, model, seed: int):
    return model.init(jax.random.key(seed), *self.example_inputs(1))["params"]

  def encode(self, model, params, *inputs) -> dict:
    """The static encoders on raw inputs -> a role's feature dict (no labels)."""
    raise NotImplementedError

  def example_features(self, model, params, n: int) -> dict:
    """Features of n labelled samples (zeros), shaped as `encode_split` gives them."""
    f = jax.eval_shape(lambda p: self.encode(model, p, *self.example_inputs(n)), params)
    out = {k: jnp.zeros(v.shape, v.dtype) for k, v in f.items()}
    out.update(self.example_labels(n))
    return out

  def example_labels(self, n: int) -> dict:
    return {"answer": jnp.zeros((n,), jnp.int32)}

  # ---- data ----------------------------------------------------------------------------------
  def prepare_data(self):
    raise NotImplementedError

  def encode_split(self, model, params, devices: dict) -> dict:
    raise NotImplementedError

  def global_loss(self, model, params, batch):
    """Cloud training on a raw batch -> (loss, {metric: value})."""
    raise NotImplementedError

  def device_constants(self, model, params) -> dict:
    """Arrays every device carries beside its roles (e.g. canonical question codes), added by
    `encode_split` and by the generic meta-training pool."""
    return {}

  def source_prior(self, data):
    """The cloud's label prior (EM's source prior), or None for a task without label groups."""
    return None

  # ---- the device side, on features -----------------------------------------------------------
  def scores(self, model, params, feats):
    """What inference produces on a role (logits; a similarity matrix)."""
    raise NotImplementedError

  def metric_values(self, scores, feats) -> dict:
    """{metric name: scalar} for one device's role from its scores."""
    raise NotImplementedError

  def loss(self, model, params, feats):
    """The supervised loss on a labelled role (FTA, oracle)."""
    raise NotImplementedError

  def anchor_elements(self, context) -> dict:
    """{modality: [N, E]}: what a device's unlabelled context contributes as anchor elements.
    The first modality is the primary one (its elements carry the cloud-side labels)."""
    raise NotImplementedError

  def anchor_info(self, cfg) -> dict:
    """Facts about a device's anchor elements copied into each anchored method's `info`."""
    return {}

  def report_notes(self, cfg) -> list:
    """Paragraphs report.md states before the table (e.g. how a metric counts hits)."""
    return []

  # ---- meta-training (cloud only) ------------------------------------------------------------
  def meta_devices(self, indices, query_size: int, context_size: int | None = None) -> dict:
    """Fresh, fully labelled meta devices (numpy, stacked): the cloud's view. `context_size`
    (default: the data config's) renders fewer context samples; the query is unchanged."""
    raise NotImplementedError

  def meta_shortfall(self, context_size: int, query_size: int) -> str | None:
    """Why meta devices with these role sizes cannot be drawn (a real dataset's categories
    may be too small), or None when they can."""
    return None

  def meta_windows_per_stream(self) -> int:
    """Meta devices come in streams of this many consecutive ids (a stream's windows in time
    order: id i is window i % W of stream i // W). 1: every meta device stands alone."""
    return 1

  def encode_meta(self, model, params, raw) -> dict:
    """Jittable: raw meta devices -> {'context': feats, 'query': feats (labelled)}."""
    raise NotImplementedError

  def meta_data_key(self) -> str:
    """What this task's meta devices are a function of (its data config, and the version of
    what makes them: `meta_data_version`): part of the key of a stored pool of encoded meta
    devices (training/meta_pool). `encode_meta` must read only the leaves under
    `encoder_prefixes` (the pool's other key part)."""
    data = self.config.data.to_dict()
    data.pop("data_dir", None)                     # where the data lie does not change them
    return json.dumps({"task": self.name, "data": data, "version": self.meta_data_version()},
                      sort_keys=True, default=list)

  def meta_data_version(self):
    """The version of the generator (or the state of the data files) behind the meta devices:
    bump-tracking a config alone would miss. JSON-serialisable."""
    return None

  def meta_loss(self, model, params, query):
    """(loss, selection metric) on a meta device's labelled query (all it is labelled with)."""
    raise NotImplementedError

  # ---- checks --------------------------------------------------------------------------------
  def validate_config(self, cfg) -> None:
    """Raises ConfigError for task-specific invalid values."""

  # helpers --------------------------------------------------------------------------------------
  @property
  def selection_metric(self) -> Metric:
    return self.metrics[0]

  def anchor_dims(self, model, params) -> dict:
    """{modality: element dim}, primary first."""
    el = jax.eval_shape(self.anchor_elements, self.example_features(model, params, 2))
    return {m: int(el[m].shape[-1]) for m in self.anchor_modalities}

  def num_elements(self, model, params, n_context: int) -> dict:
    """{modality: elements in a context of n_context samples}, primary first."""
    el = jax.eval_shape(self.anchor_elements, self.example_features(model, params, n_context))
    return {m: int(el[m].shape[0]) for m in self.anchor_modalities}


def pad_to(x, n):
  """x padded along axis 0 to n rows by repeating its last row (fixed shapes: one compile)."""
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)], axis=0)


def stack(examples):
  """A list of nested dicts of arrays -> one nested dict with a leading axis."""
  first = examples[0]
  if isinstance(first, dict):
    return {k: stack([e[k] for e in examples]) for k in first}
  return np.stack([np.asarray(e) for e in examples])


def encode_roles(enc, params, devices: dict, inputs: tuple, keep: tuple,
                 chunk: int = 512) -> dict:
  """Runs the jitted static encoders `enc(params, *inputs)` over every role of a device split.

  `devices[role]` holds raw fields with leading axes [N devices, n samples]; `inputs` names the
  fields fed to the encoders, `keep` the raw fields copied unchanged (labels, question types).
  Samples are encoded in fixed-size chunks of `chunk` (padded), so every split compiles once."""
  out = {}
  for role, data in devices.items():
    if not isinstance(data, dict) or inputs[0] not in data:
      continue
    nd, n = data[inputs[0]].shape[:2]
    flat = [data[f].reshape((nd * n,) + data[f].shape[2:]) for f in inputs]
    parts = []
    for s in range(0, nd * n, chunk):
      xs = [x[s:s + chunk] for x in flat]
      f = enc(params, *[pad_to(x, chunk) for x in xs])
      parts.append(jax.tree.map(lambda x: np.asarray(x)[:len(xs[0])], f))
    feats = {k: np.concatenate([p[k] for p in parts]).reshape((nd, n) + parts[0][k].shape[1:])
             for k in parts[0]}
    for k in keep:
      if k in data:
        feats[k] = data[k]
    out[role] = feats
  out["device_id"] = np.asarray(devices["device_id"])
  return out
