"""Sequential-recommendation device models: SASRec and GRU4Rec as the DUET/Persona
line builds them (docs/methods.md), d = `dim`, a click window of L items.

    click window [L] --encoder (item + position embeddings -> Dense-tanh -> backbone,
                      read at the last real click)--> user vector u [d]          (static)
    candidate items [n] --target (item embedding -> Dense-tanh-Dense)--> t [n, d] (static)
    u --classifier (Dense d -> tanh -> Dense d)--> u'; score_i = <u', t_i>      (dynamic)

The classifier's two Dense layers are what Persona and DUET edit or generate (the official
`_classifier`, StackedDense(d, [d, d], [Tanh, None])).

`classifier_form="generated"` is the official DUET model itself (the released `meta_sasrec`): no
classifier parameters; its two layers are generated per click window from the sequence's state,
s = GRU(h)[len - 1], c = Dense-tanh-Dense(s), W_i = reshape(c A_i + a_i), b_i = c B_i + β_i, and
the whole model (embeddings, encoder, GRU, MLP) is trained end to end from scratch. The heads
A, a, B, β are fixed random draws, fmod(N(0, 1), 2), never trained: the released code keeps
them in plain Python lists, so its optimiser never sees them. Here they are constants drawn
from a fixed key inside the module (not parameters), which gives the same behaviour. The user
vector such a model encodes is the generated classifier's output; scoring is then the plain
dot product.

Padding: windows are left-aligned with trailing 0s and the user vector is read at position
len - 1 (len = the number of real clicks; an empty window reads position 0), as the official
code does. The official SASRec passes no attention mask, so real clicks also attend to the
padding positions; `attention_mask="padding"` (our default) masks the padding keys instead, so a
user vector depends on the real clicks only; `"none"` reproduces the official behaviour. GRU4Rec
reads the GRU state at len - 1, which padding after it cannot reach.
"""
import flax.linen as nn
import jax
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


CLASSIFIER_FORMS = ("dense", "generated")


class GeneratedClassifier(nn.Module):
  """The official DUET's classifier, generated from the click window (module docstring)."""
  dim: int
  layers: int = 2
  head_seed: int = 0

  @nn.compact
  def __call__(self, u, h, last):
    """u [.., d] user vectors, h [.., L, d] the window's embedded clicks, last [..] the index
    of the last real click -> the generated classifier's output [.., d]."""
    gru = nn.RNN(nn.GRUCell(self.dim, kernel_init=nn.initializers.xavier_uniform(),
                            recurrent_kernel_init=nn.initializers.xavier_uniform(), name="gru"))
    states = gru(h.reshape((-1,) + h.shape[-2:])).reshape(h.shape)
    s = jnp.take_along_axis(states, last[..., None, None], axis=-2)[..., 0, :]
    c = nn.Dense(self.dim, name="code_out")(jnp.tanh(nn.Dense(self.dim, name="code_in")(s)))
    d = self.dim
    key = jax.random.key(self.head_seed)
    x = u
    for i in range(self.layers):
      ka, kb, kc, kd = jax.random.split(jax.random.fold_in(key, i), 4)
      draw = lambda k, shape: jnp.fmod(jax.random.normal(k, shape), 2.0)
      a_mat, a_vec = draw(ka, (d, d * d)), draw(kb, (d * d,))
      b_mat, b_vec = draw(kc, (d, d)), draw(kd, (d,))
      w = (c @ a_mat + a_vec).reshape(c.shape[:-1] + (d, d))
      b = c @ b_mat + b_vec
      x = jnp.einsum("...i,...io->...o", x, w) + b
      if i < self.layers - 1:
        x = jnp.tanh(x)
    return x


class SeqRec(nn.Module):
  num_items: int                     # item ids 1..num_items; 0 is padding
  backbone: str = "sasrec"           # "sasrec" | "gru4rec"
  dim: int = 32
  window: int = 10
  heads: int = 4
  attention_mask: str = "padding"    # "padding" | "none" (the official SASRec)
  classifier_form: str = "dense"     # "dense" | "generated" (the official DUET model)

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
    if self.classifier_form == "dense":
      self.classifier = Classifier(self.dim)
    elif self.classifier_form == "generated":
      self.generator = GeneratedClassifier(self.dim)
    else:
      raise ValueError(f"unknown model.classifier_form {self.classifier_form!r}; expected "
                       f"'dense' or 'generated'")

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
    u = jnp.take_along_axis(out, last[..., None, None], axis=-2)[..., 0, :]
    if self.classifier_form == "generated":
      return self.generator(u, h, last)
    return u

  def encode_items(self, items):
    """[.., n] candidate ids -> t [.., n, d]."""
    return self.target_out(jnp.tanh(self.target_in(self.item_embed(items))))

  def _classify(self, user):
    # the generated classifier already ran inside encode_user
    return self.classifier(user) if self.classifier_form == "dense" else user

  def score_from_features(self, user, items):
    """The dynamic part: scores [.., n] of candidates t [.., n, d] for user vectors [.., d]."""
    return jnp.einsum("...d,...nd->...n", self._classify(user), items)

  def score_rows(self, user, item):
    """The dynamic part row by row: user [.., d], item [.., d] -> scores [..]."""
    return (self._classify(user) * item).sum(-1)

  def __call__(self, window, candidates):
    return self.score_from_features(self.encode_user(window), self.encode_items(candidates))
