"""The on-device image classifier of the drifting-digits task.

    image [.., H, W] uint8 --encoder (CNN)--> embedding [.., D]            (static)
    embedding --classifier (LayerNorm -> Dense -> ReLU -> Dense)--> logits [.., 10]  (dynamic)

The convolutional encoder is static (config `dynamic_leaves` leaves it out), so device-side
adaptation runs on cached embeddings: `classify_from_features(emb)` is the dynamic part alone.
The classifier's two Dense layers are what Persona and DUET edit or generate (the adaptive
layers), its LayerNorm what TENT adapts. The layers are the video models' (`video_lmm`), so the
encoder is the same CNN a video frame goes through.
"""
from typing import Sequence

import flax.linen as nn

from mmpg_jax.models.video_lmm import FrameEncoder, MLPHead


class DigitClassifier(nn.Module):
  num_classes: int = 10
  channels: Sequence[int] = (16, 32, 32)
  embed_dim: int = 64
  head_hidden: int = 64

  def setup(self):
    self.encoder = FrameEncoder(tuple(self.channels), self.embed_dim)
    self.classifier = MLPHead(self.num_classes, self.head_hidden)

  def encode_images(self, images):
    return self.encoder(images)

  def classify_from_features(self, emb):
    return self.classifier(emb)

  def classifier_features(self, emb):
    """The input of the classifier's last layer (logits = it @ out/kernel + out/bias)."""
    return self.classifier.features(emb)

  def __call__(self, images):
    return self.classify_from_features(self.encode_images(images))
