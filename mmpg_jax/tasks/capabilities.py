"""What a task can do beyond the core `Task`: small declared interfaces.

A task states a capability by inheriting its class (`class Task(VideoTask, LabelGroups, ...)`);
a method family builds a row only for tasks that declare what it needs, testing
`isinstance(task, LinearHead)`, never probing attributes. Each interface's abstract methods
must be implemented, or the task cannot be instantiated (Python's abc says which are missing).

  LabelGroups       label ids in softmax groups, with EM label-shift correction (prior_em,
                    em2, the FDA's anchor EM)
  KnownLabelPrior   LabelGroups whose true query label prior is known (cdc_mmpg's diagnosis)
  LinearHead        scores = features @ kernel + bias of one layer (T3A, LAME, FOA)
  GalleryRanking    scores rank a gallery against queries (QB-Norm, dual softmax)
  Entropy           an unsupervised objective on scored rows (the rollback's entropy check)
  ScoredContext     Entropy on the unlabelled context itself (TENT, cloud-side TENT)
  PooledMetrics     metrics computed from every device's rows at once (one AUC over users)
  ShiftedMetaData   meta devices drawn from other shift ranges (cdc_robust's wide variants)
"""
import abc
import collections.abc
import copy

import ml_collections


class LabelGroups(abc.ABC):
  """Label ids sharing one softmax per group. The task sets `label_groups` ((lo, hi), ...;
  non-empty) and `label_bias_leaf` (the output bias a label-shift correction edits) and
  `source_prior(data)` (the cloud's label prior, inherited from the core where it is None)."""

  @abc.abstractmethod
  def label_posteriors(self, model, params, dev):
    """[n, G, A] posteriors of every label group on each context sample (forward only)."""

  @abc.abstractmethod
  def asked_posteriors(self, model, params, dev):
    """[n, A] posteriors of what was actually asked of each context sample."""

  @abc.abstractmethod
  def element_labels(self, dev):
    """[N, G] cloud-side labels of the primary modality's context elements (meta-training's
    auxiliary loss only; a device never sends labels)."""

  def asked_groups(self, feats):
    """[n] the label group (index into `label_groups`) asked of each sample of a role, or None
    where the task does not say (one group)."""
    return None


class KnownLabelPrior(LabelGroups):
  """The device's true label distribution can be read off its labelled query (diagnosis only:
  cdc_mmpg compares its label-prior estimates with it)."""

  @abc.abstractmethod
  def query_label_prior(self, dev):
    """[A] the label distribution of the device's labelled query, normalised within each
    label group."""


class LinearHead(abc.ABC):
  """Scores are a linear classifier of features: `classifier_layer` names a layer with
  `kernel` [H, A] and `bias` [A], scores = classifier_features(...) @ kernel + bias."""
  classifier_layer = ""

  @abc.abstractmethod
  def classifier_features(self, model, params, feats):
    """[n, H] the classifier layer's input on a role."""

  def activation_layers(self, model, params, feats):
    """[[n, H_l], ...] the activations whose statistics FOA matches to the source's: every
    layer between the static encoders and the scores a search can move (default: the
    classifier's input)."""
    return [self.classifier_features(model, params, feats)]


class GalleryRanking(abc.ABC):
  """Scores rank a device's gallery for each query (text-to-video retrieval)."""

  @abc.abstractmethod
  def training_queries(self, model, params, n: int, seed: int):
    """[n, D] codes of the cloud's own training queries."""

  @abc.abstractmethod
  def gallery_scores(self, model, params, codes, dev):
    """[n, n_gallery] similarities of query codes against the device's gallery."""


class Entropy(abc.ABC):
  """An unsupervised objective on the rows of `check_role` (no labels read): the label-free
  check before swapping in an edit (deploy.rollback) compares it with and without the edit."""

  @property
  def check_role(self) -> str:
    """The role whose rows the rollback check scores (default: the unlabelled context)."""
    return self.context_role

  @abc.abstractmethod
  def entropy(self, model, params, feats):
    """A scalar: the mean prediction entropy over a role's rows."""


class ScoredContext(Entropy):
  """The context role holds samples the model scores, so `entropy` can be minimised on it
  (TENT on the device; cloud_tent on uploaded context features)."""


class PooledMetrics(abc.ABC):
  """Metrics that are one figure over every device's rows (e.g. one AUC over all users'
  candidate rows), not a mean over devices: {metric name: f({field: [N, ...]}) -> float}."""

  @property
  @abc.abstractmethod
  def pooled_metrics(self) -> dict:
    """{metric name: function of every device's per-row values}."""


class ShiftedMetaData(abc.ABC):
  """Meta devices can be drawn from other shift ranges than the training ones (cdc_robust's
  wide variants): `with_data(overrides)` is this task on updated `config.data`, refused by
  `check_meta_data` where it would draw what only an evaluation group may show."""

  @abc.abstractmethod
  def check_meta_data(self, overrides) -> None:
    """Raises ConfigError if meta-training data with these `config.data` overrides would draw
    what only the evaluation groups (test OOD, validation OOD) may show."""

  def resolve_meta_data(self, overrides) -> dict:
    """`overrides` with any rule the task's data layer states (e.g. a shift widening rule)
    turned into plain config.data values (default: as they are)."""
    return overrides

  def with_data(self, overrides):
    """This task with `config.data` updated by the nested dict `overrides`."""
    overrides = self.resolve_meta_data(overrides)
    self.check_meta_data(overrides)
    cfg = copy.deepcopy(self.config)

    def update(node, new):
      for k, v in new.items():
        if k in node and _is_mapping(v) and _is_mapping(node[k]):
          update(node[k], v)
        else:
          node[k] = v
    with cfg.unlocked():
      update(cfg.data, overrides)
    return type(self)(cfg)


def _is_mapping(x) -> bool:
  return isinstance(x, (collections.abc.Mapping, ml_collections.ConfigDict))


def pooled_metrics(task) -> dict:
  """The task's pooled metrics ({} for a task without them)."""
  return task.pooled_metrics if isinstance(task, PooledMetrics) else {}
