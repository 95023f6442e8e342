"""Cloud-side TENT (`cloud_tent`): what the device uploads beyond the anchors, and the cloud's
refinement of the edited model on it. The gradient steps are the cloud's; the device merges."""
import jax
import numpy as np

from mmpg_jax.ondevice import device


def sample_bytes(task, model, params, dbytes):
  """Bytes of one encoded sample's features (what `cloud_tent` uploads per sample)."""
  f = jax.eval_shape(lambda p: task.encode(model, p, *task.example_inputs(1)), params)
  return sum(int(np.prod(v.shape)) for v in f.values()) * dbytes


def cloud_samples_upload(task, dev, m: int):
  """cloud_tent's extra upload: the encoded features of the first m context samples."""
  return jax.tree.map(lambda x: x[:m], dev[task.context_role])


def cloud_refine(loss_fn, edited, leaves, feats, hp):
  """In the cloud: `hp['steps']` Adam steps of the unsupervised objective on the uploaded
  samples, from the edited model (the cloud holds the device model and the edit it made).
  Zero steps return the edited model itself. The device merges the result, nothing more."""
  return device.finetune(loss_fn, edited, leaves, feats, optimizer="adam", lr=hp["lr"],
                         steps=hp["steps"])
