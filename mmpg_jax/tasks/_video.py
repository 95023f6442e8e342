"""Pieces shared by the video tasks: frame elements, and the data side (`VideoTask`): the
embedded moving-digits pixels or a real dataset's frame features, chosen by data.name."""
import jax.numpy as jnp

from mmpg_jax.core.config_errors import ConfigError
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import pipeline, real_video
from mmpg_jax.data import tfds_real_video as trv
from mmpg_jax.tasks.base import Task, stack
from mmpg_jax.tasks.capabilities import ShiftedMetaData


def frame_elements(frames, mask=None):
  """[n, T, D] frame embeddings -> [n*(T-1), 2D] elements [e_t, e_{t+1} - e_t]: a frame with
  its temporal difference, so an anchor carries motion (a single frame shows none).

  With a frame mask [n, T] (real videos shorter than T), each video's padded frames repeat its
  last real frame first, so every element shows real content (the padded steps: the last frame,
  still) and the element count stays fixed."""
  if mask is not None:
    t = frames.shape[1]
    last = jnp.maximum(mask.sum(-1).astype(jnp.int32) - 1, 0)          # [n]
    idx = jnp.minimum(jnp.arange(t)[None, :], last[:, None])            # [n, T]
    frames = jnp.take_along_axis(frames, idx[..., None], axis=1)
  e, nxt = frames[:, :-1], frames[:, 1:]
  el = jnp.concatenate([e, nxt - e], axis=-1)
  return el.reshape((-1, el.shape[-1]))


def reads_features(config) -> bool:
  """True when the task's data are pre-extracted frame features of a real video dataset (the
  frame encoder is then a projection), False for the embedded moving-digits pixels."""
  return config.data.name in real_video.DATASETS


class VideoTask(Task, ShiftedMetaData):
  """The data side both video tasks share: where videos come from (moving-digits pixels, or a
  real dataset's frame features when data.name is one of real_video.DATASETS), meta devices,
  and the data's config checks. A subclass sets `text_len_key` (its text field's length)."""

  text_len_key = ""

  def __init__(self, config):
    super().__init__(config)
    self.features = reads_features(config)   # real frame features, not pixels
    self._bench = None
    self._source = None

  def source(self):
    """The real dataset's files, read once per task (label_groups and the vocabularies ask
    often; trv.source would fingerprint every feature file on each call)."""
    if self._source is None:
      self._source = trv.source(self.config.data)
    return self._source

  def example_inputs(self, n):
    d = self.config.data
    video = (jnp.zeros((n, d.frames, d.feature_dim), jnp.float32) if self.features
             else jnp.zeros((n, d.frames, d.size, d.size), jnp.uint8))
    return video, jnp.ones((n, d[self.text_len_key]), jnp.int32)

  def prepare_data(self):
    if self._bench is None:
      self._bench = (trv.prepare(self.config.data) if self.features
                     else pipeline.prepare(self.config.data))
    return self._bench

  def meta_devices(self, indices, query_size, context_size=None):
    roles = {"context": context_size or self.config.data.context_size, "query": query_size}
    if self.features:
      bench = self.prepare_data()
      return stack([bench.meta_device(int(i), roles) for i in indices])
    sampler = pipeline.MetaDeviceSampler(self.config.data, roles=roles, labelled=True)
    return stack([sampler.device(int(i)) for i in indices])

  def meta_data_version(self):
    if self.features:
      return real_video.input_files(self.config.data.to_dict())
    return md.GENERATOR_VERSION

  def validate_config(self, cfg):
    if self.features:
      trv.validate_data_config(cfg)
    else:
      pipeline.validate_data_config(cfg)

  def meta_shortfall(self, context_size, query_size):
    return self.source().meta_shortfall(context_size, query_size) if self.features else None

  def resolve_meta_data(self, overrides):
    return pipeline.resolve_widen(self.config.data, overrides)

  def check_meta_data(self, overrides):
    if self.features:                               # no shift parameters to widen
      raise ConfigError(f"task {self.name!r} on a real video dataset cannot meta-train on "
                        f"other data (its meta devices are the dataset's); remove the wide "
                        f"variants from config.cdc_robust.variants")
    pipeline.check_meta_shift(self.config.data, overrides)
