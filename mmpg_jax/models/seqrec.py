"""Sequential-recommendation device models: SASRec and GRU4Rec as the DUET/Persona
line builds them (docs/methods.md), d = `dim`, a click window of L items.

    click window [L] --encoder (item + position embeddings -> Dense-tanh -> backbone,
                      read at the last real click)--> user vector u [d]          (static)
    candidate items [n] --target (item embedding -> Dense-tanh-Dense)--> t [n, d] (static)
    u --classifier (Dense d -> tanh -> Dense d)--> u'; score_i = <u', t_i>      (dynamic)

The classifier's two Dense layers are what Persona and DUET edit or generate (the official
`_classifier`, StackedDense(d, [d, d], [Tanh, None])).

Padding: windows are left-aligned with trailing 0s and the user vector is read at position
len - 1 (len = the number of real clicks; an empty window reads position 0), as the official
code does. The official SASRec passes no attention mask, so real clicks also attend to the
padding positions; `attention_mask="padding"` (our default) masks the padding keys instead, so a
user vector depends on the real clicks only; `"none"` reproduces the official behaviour. GRU4Rec
reads the GRU state at len - 1, which padding after it cannot reach.
"""
import flax.linen as nn
import jax.numpy as jnp


class TransformerLayer(nn.Module):
  """PyTorch's nn.TransformerEncoderLayer as the official SASRec uses it: post-LN, ReLU
  feed-forward of 4d, dropout 0."""
  dim: int
  heads: int = 4

  @nn.compact
  def __call__(self, x, mask):
    attn = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim,
                                           name="attention")(x, x, mask=mask)
    x = nn.LayerNorm(name="norm1")(x + attn)
    ff = nn.Dense(self.dim, name="ff_out")(nn.relu(nn.Dense(4 * self.dim, name="ff_in")(x)))
    return nn.LayerNorm(name="norm2")(x + ff)


class Classifier(nn.Module):
  dim: int

  def setup(self):
    self.hidden = nn.Dense(self.dim)
    self.out = nn.Dense(self.dim)

  def __call__(self, u):
    return self.out(jnp.tanh(self.hidden(u)))


class SeqRec(nn.Module):
  num_items: int                     # item ids 1..num_items; 0 is padding
  backbone: str = "sasrec"           # "sasrec" | "gru4rec"
  dim: int = 32
  window: int = 10
  heads: int = 4
  attention_mask: str = "padding"    # "padding" | "none" (the official SASRec)

  def setup(self):
    init = nn.initializers.xavier_uniform()
    self.item_embed = nn.Embed(self.num_items + 1, self.dim, embedding_init=init)
    self.pos_embed = nn.Embed(self.window, self.dim, embedding_init=init)
    self.seq_trans = nn.Dense(self.dim)
    self.target_in = nn.Dense(self.dim)
    self.target_out = nn.Dense(self.dim)
    if self.backbone == "sasrec":
      self.transformer = TransformerLayer(self.dim, self.heads)
    elif self.backbone == "gru4rec":
      self.gru = nn.RNN(nn.GRUCell(self.dim))
    else:
      raise ValueError(f"unknown model.backbone {self.backbone!r}; expected 'sasrec' or "
                       f"'gru4rec'")
    self.classifier = Classifier(self.dim)

  def _embed(self, window):
    return jnp.tanh(self.seq_trans(self.item_embed(window)
                                   + self.pos_embed(jnp.arange(window.shape[-1]))))

  def window_elements(self, window):
    """[.., L] item ids -> [.., L, d]: the click window's embedded elements (the real-time data
    a device summarises; zeros at padding)."""
    return self._embed(window) * (window > 0)[..., None]

  def encode_user(self, window):
    """[.., L] -> the user vector u [.., d], read at the last real click."""
    h = self._embed(window)
    real = jnp.asarray(window) > 0
    if self.backbone == "sasrec":
      mask = None
      if self.attention_mask == "padding":
        # keys: real clicks; an empty window attends to position 0 rather than to nothing
        keys = real.at[..., 0].set(True)
        mask = nn.make_attention_mask(jnp.ones_like(keys), keys)
      out = self.transformer(h, mask)
    else:
      out = self.gru(h)
    last = jnp.maximum(real.sum(-1) - 1, 0)
    return jnp.take_along_axis(out, last[..., None, None], axis=-2)[..., 0, :]

  def encode_items(self, items):
    """[.., n] candidate ids -> t [.., n, d]."""
    return self.target_out(jnp.tanh(self.target_in(self.item_embed(items))))

  def score_from_features(self, user, items):
    """The dynamic part: scores [.., n] of candidates t [.., n, d] for user vectors [.., d]."""
    return jnp.einsum("...d,...nd->...n", self.classifier(user), items)

  def score_rows(self, user, item):
    """The dynamic part row by row: user [.., d], item [.., d] -> scores [..]."""
    return (self.classifier(user) * item).sum(-1)

  def __call__(self, window, candidates):
    return self.score_from_features(self.encode_user(window), self.encode_items(candidates))
