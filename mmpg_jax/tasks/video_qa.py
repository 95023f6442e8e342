"""Video question answering on the moving-digits benchmark (DESIGN §3.1, §4).

Device model: `models.video_lmm.VideoLMM` (static frame CNN and question GRU; dynamic temporal
pooling, FiLM fusion and answer head). A device's roles hold, per sample, the frame embeddings
`frames` [T, D], the asked question's code `q` [Dq], its type `qtype` and, where labelled, the
`answer`. Every device also carries `type_q` [Q, Dq], one canonical question per question type:
the device can ask each type of every video (forward passes only) for EM label-shift
correction. Label groups are the question types' answer ranges of the shared 14-way answer
vocabulary. Anchor elements: frame embeddings with their temporal differences.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmpg_jax import models
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import pipeline
from mmpg_jax.tasks import _video
from mmpg_jax.tasks.base import Metric
from mmpg_jax.tasks.base import Task as _Base
from mmpg_jax.tasks.base import encode_roles, stack


class Task(_Base):
  name = "video_qa"
  datasets = ("moving_digits",)
  metrics = (Metric("accuracy"),)
  label_groups = md.ANSWER_GROUPS
  label_bias_leaf = "answer_head/out/bias"
  classifier_layer = "answer_head/out"     # scores = classifier_features @ kernel + bias
  encoder_prefixes = ("frame_encoder/", "question_encoder/")

  def build_model(self):
    return models.build(self.config.model, num_answers=md.NUM_ANSWERS, vocab_size=len(md.VOCAB))

  def example_inputs(self, n):
    d = self.config.data
    return (jnp.zeros((n, d.frames, d.size, d.size), jnp.uint8),
            jnp.ones((n, d.question_len), jnp.int32))

  def encode(self, model, params, video, question):
    """Static encoders: video [n,T,H,W] uint8, question [n,L] -> {'frames', 'q'}."""
    frames = model.apply({"params": params}, video, method=model.encode_frames)
    q = model.apply({"params": params}, question, method=model.encode_question)
    return {"frames": frames, "q": q}

  # ---- data ----------------------------------------------------------------------------------
  def prepare_data(self):
    return pipeline.prepare(self.config.data)

  def type_question_codes(self, model, params):
    """One canonical question per question type (its first template), encoded: [Q, Dq]."""
    tokens = np.stack([md.tokenize(md.QUESTION_TEMPLATES[t][0], self.config.data.question_len)
                       for t in md.QUESTION_TYPES])
    return np.asarray(model.apply({"params": params}, tokens, method=model.encode_question))

  def encode_split(self, model, params, devices, chunk: int = 512):
    # Captions are never read: in this task a caption states the answer.
    enc = jax.jit(lambda p, v, q: self.encode(model, p, v, q))
    out = encode_roles(enc, params, devices, ("video", "question"), ("qtype", "answer"),
                              chunk)
    for k, v in self.device_constants(model, params).items():
      out[k] = np.repeat(v[None], len(out["device_id"]), axis=0)
    return out

  def global_loss(self, model, params, batch):
    """Cross-entropy over every question type of every video (one frame encoding per video)."""
    frame_emb = model.apply({"params": params}, batch["video"], method=model.encode_frames)
    q_code = model.apply({"params": params}, batch["questions"], method=model.encode_question)
    loss, acc = self.meta_loss(model, params, {"frames": frame_emb, "q": q_code,
                                               "answers": batch["answers"]})
    return loss, {"accuracy": acc}

  def source_prior(self, data, max_examples: int = 4096):
    """Frequency of each answer in the cloud training data, add-one smoothed. Every question
    type is trained on every video, so this is what the model saw."""
    src = data.global_source()
    idx = np.linspace(0, len(src) - 1, min(len(src), max_examples)).astype(int)
    answers = np.concatenate([np.asarray(src[int(i)]["answers"]).ravel() for i in idx])
    counts = np.bincount(answers, minlength=md.NUM_ANSWERS) + 1.0
    return (counts / counts.sum()).astype(np.float32)

  # ---- the device side -----------------------------------------------------------------------
  def scores(self, model, params, feats):
    return model.apply({"params": params}, feats["frames"], feats["q"],
                       method=model.answer_from_features)

  def metric_values(self, scores, feats):
    return {"accuracy": (scores.argmax(-1) == feats["answer"]).mean()}

  def loss(self, model, params, feats):
    return optax.softmax_cross_entropy_with_integer_labels(
        self.scores(model, params, feats), feats["answer"]).mean()

  def entropy(self, model, params, feats):
    lp = jax.nn.log_softmax(self.scores(model, params, feats))
    return -(jnp.exp(lp) * lp).sum(-1).mean()

  def classifier_features(self, model, params, feats):
    """[n, H]: the answer head's last-layer input on a role (T3A, LAME)."""
    return model.apply({"params": params}, feats["frames"], feats["q"],
                       method=model.answer_head_features)

  def label_posteriors(self, model, params, dev):
    """Every question type asked of each context video: [n, Q, A]. Forward passes only."""
    frames, type_q = dev["context"]["frames"], dev["type_q"]
    n, nq = frames.shape[0], type_q.shape[0]
    f = jnp.broadcast_to(frames[:, None], (n, nq) + frames.shape[1:])
    q = jnp.broadcast_to(type_q[None], (n,) + type_q.shape)
    return jax.nn.softmax(self.scores(model, params, {"frames": f, "q": q}))

  def asked_posteriors(self, model, params, dev):
    return jax.nn.softmax(self.scores(model, params, dev["context"]))

  def anchor_elements(self, context):
    return {"video": _video.frame_elements(context["frames"])}

  def anchor_info(self, cfg):
    d = cfg.data
    return {"frames_in_context": d.context_size * d.frames,
            "frame_elements": d.context_size * (d.frames - 1)}

  def query_label_prior(self, dev):
    counts = jax.nn.one_hot(dev["query"]["answer"], md.NUM_ANSWERS).sum(0)
    return jnp.concatenate([counts[lo:hi] / jnp.maximum(counts[lo:hi].sum(), 1.0)
                            for lo, hi in self.label_groups])

  def element_labels(self, dev):
    """Each frame element carries its video's answers (element order is video-major)."""
    t_el = dev["context"]["frames"].shape[1] - 1
    return jnp.repeat(dev["context"]["answers"], t_el, axis=0)

  # ---- meta-training -------------------------------------------------------------------------
  def meta_devices(self, indices, query_size):
    roles = {"context": self.config.data.context_size, "query": query_size}
    sampler = pipeline.MetaDeviceSampler(self.config.data, roles=roles, labelled=True)
    return stack([sampler.device(int(i)) for i in indices])

  def encode_meta(self, model, params, raw):
    ctx, qry = raw["context"], raw["query"]
    enc = lambda x, m: model.apply({"params": params}, x, method=m)
    return {"context": {"frames": enc(ctx["video"], model.encode_frames),
                        "answers": ctx["answers"]},
            "query": {"frames": enc(qry["video"], model.encode_frames),
                      "q": enc(qry["questions"], model.encode_question),
                      "answers": qry["answers"]}}

  def meta_loss(self, model, params, query):
    """Every question type of every query video: frames [n, T, D], q [n, Q, Dq], answers
    [n, Q] -> (cross-entropy, accuracy)."""
    nq = query["q"].shape[1]
    frames = jnp.broadcast_to(query["frames"][:, None], (query["frames"].shape[0], nq)
                              + query["frames"].shape[1:])
    logits = self.scores(model, params, {"frames": frames, "q": query["q"]})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, query["answers"]).mean()
    return loss, (logits.argmax(-1) == query["answers"]).mean()

  def device_constants(self, model, params):
    return {"type_q": self.type_question_codes(model, params)}

  def validate_config(self, cfg):
    pipeline.validate_data_config(cfg)

  def check_meta_data(self, overrides):
    pipeline.check_meta_shift(self.config.data, overrides)
