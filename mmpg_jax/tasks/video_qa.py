"""Video question answering on the moving-digits benchmark.

Device model: `models.video_lmm.VideoLMM` (static frame CNN and question GRU; dynamic temporal
pooling, FiLM fusion and answer head). A device's roles hold, per sample, the frame embeddings
`frames` [T, D], the asked question's code `q` [Dq], its type `qtype` and, where labelled, the
`answer`. Every device also carries `type_q` [Q, Dq], one canonical question per question type:
the device can ask each type of every video (forward passes only) for EM label-shift
correction. Label groups are the question types' answer ranges of the shared 14-way answer
vocabulary. Anchor elements: frame embeddings with their temporal differences.

Real datasets (data.name msrvtt_qa / msvd_qa; data/real_video.py): the frame encoder is a
linear projection of pre-extracted frame features (model.frame_encoder_kind='projection'),
roles carry a `frame_mask` [T] (temporal pooling and anchors ignore padded frames), the answer
vocabulary is the top data.num_answers training answers (one label group), questions are the
data's own (no question types: label posteriors are those of the asked questions), and meta
devices draw on the meta devices' labelled samples.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmpg_jax import models
from mmpg_jax.data import moving_digits as md
from mmpg_jax.data import real_video
from mmpg_jax.tasks import _video
from mmpg_jax.tasks.base import Metric, encode_roles
from mmpg_jax.tasks.capabilities import KnownLabelPrior, LinearHead, ScoredContext


class Task(_video.VideoTask, KnownLabelPrior, LinearHead, ScoredContext):
  name = "video_qa"
  datasets = ("moving_digits",) + real_video.QA_DATASETS
  metrics = (Metric("accuracy"),)
  label_bias_leaf = "answer_head/out/bias"
  classifier_layer = "answer_head/out"     # scores = classifier_features @ kernel + bias
  text_len_key = "question_len"
  encoder_prefixes = ("frame_encoder/", "question_encoder/")

  @property
  def num_answers(self) -> int:
    return len(self.source().answers) if self.features else md.NUM_ANSWERS

  @property
  def label_groups(self):
    return ((0, self.num_answers),) if self.features else md.ANSWER_GROUPS

  def build_model(self):
    vocab = len(self.source().words) if self.features else len(md.VOCAB)
    return models.build(self.config.model, num_answers=self.num_answers, vocab_size=vocab)

  def encode(self, model, params, video, question):
    """Static encoders: video [n,T,H,W] uint8, question [n,L] -> {'frames', 'q'}."""
    frames = model.apply({"params": params}, video, method=model.encode_frames)
    q = model.apply({"params": params}, question, method=model.encode_question)
    return {"frames": frames, "q": q}

  # ---- data ----------------------------------------------------------------------------------
  def type_question_codes(self, model, params):
    """One canonical question per question type (its first template), encoded: [Q, Dq]."""
    tokens = np.stack([md.tokenize(md.QUESTION_TEMPLATES[t][0], self.config.data.question_len)
                       for t in md.QUESTION_TYPES])
    return np.asarray(model.apply({"params": params}, tokens, method=model.encode_question))

  def encode_split(self, model, params, devices, chunk: int = 512):
    # Captions are never read: in this task a caption states the answer.
    enc = jax.jit(lambda p, v, q: self.encode(model, p, v, q))
    out = encode_roles(enc, params, devices, ("video", "question"),
                       ("qtype", "answer", "frame_mask"), chunk)
    for k, v in self.device_constants(model, params).items():
      out[k] = np.repeat(v[None], len(out["device_id"]), axis=0)
    return out

  def global_loss(self, model, params, batch):
    """Cross-entropy over every question type of every video (one frame encoding per video)."""
    frame_emb = model.apply({"params": params}, batch["video"], method=model.encode_frames)
    q_code = model.apply({"params": params}, batch["questions"], method=model.encode_question)
    feats = {"frames": frame_emb, "q": q_code, "answers": batch["answers"]}
    if "frame_mask" in batch:
      feats["frame_mask"] = batch["frame_mask"]
    loss, acc = self.meta_loss(model, params, feats)
    return loss, {"accuracy": acc}

  def source_prior(self, data, max_examples: int = 4096):
    """Frequency of each answer in the cloud training data, add-one smoothed. Every question
    type is trained on every video, so this is what the model saw."""
    src = data.global_source()
    idx = np.linspace(0, len(src) - 1, min(len(src), max_examples)).astype(int)
    answers = np.concatenate([np.asarray(src[int(i)]["answers"]).ravel() for i in idx])
    counts = np.bincount(answers[answers >= 0], minlength=self.num_answers) + 1.0
    return (counts / counts.sum()).astype(np.float32)

  # ---- the device side -----------------------------------------------------------------------
  def scores(self, model, params, feats):
    return model.apply({"params": params}, feats["frames"], feats["q"], feats.get("frame_mask"),
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
    return model.apply({"params": params}, feats["frames"], feats["q"], feats.get("frame_mask"),
                       method=model.answer_head_features)

  def activation_layers(self, model, params, feats):
    """The fusion's output and the answer head's hidden layer (the last layer's input)."""
    fused = model.apply({"params": params}, feats["frames"], feats["q"], feats.get("frame_mask"),
                        method=model.fused_features)
    return [fused, self.classifier_features(model, params, feats)]

  def label_posteriors(self, model, params, dev):
    """Every question type asked of each context video: [n, Q, A]. Forward passes only.
    Real datasets have no question types: the asked questions' posteriors, [n, 1, A]."""
    if "type_q" not in dev:
      return self.asked_posteriors(model, params, dev)[:, None]
    return jax.nn.softmax(model.apply({"params": params}, dev["context"]["frames"],
                                      dev["type_q"], method=model.answers_for_questions))

  def example_labels(self, n):
    # a role's encoded features carry each sample's question type (encode_split)
    return {"answer": jnp.zeros((n,), jnp.int32), "qtype": jnp.zeros((n,), jnp.int32)}

  def asked_groups(self, feats):
    # the question type asked of each sample indexes label_groups (moving digits: digit,
    # direction); one group on real video
    return feats["qtype"] if len(self.label_groups) > 1 else None

  def asked_posteriors(self, model, params, dev):
    return jax.nn.softmax(self.scores(model, params, dev["context"]))

  def anchor_elements(self, context):
    return {"video": _video.frame_elements(context["frames"], context.get("frame_mask"))}

  def anchor_info(self, cfg):
    d = cfg.data
    return {"frames_in_context": d.context_size * d.frames,
            "frame_elements": d.context_size * (d.frames - 1)}

  def query_label_prior(self, dev):
    counts = jax.nn.one_hot(dev["query"]["answer"], self.num_answers).sum(0)   # OOV: none
    return jnp.concatenate([counts[lo:hi] / jnp.maximum(counts[lo:hi].sum(), 1.0)
                            for lo, hi in self.label_groups])

  def element_labels(self, dev):
    """Each frame element carries its video's answers (element order is video-major)."""
    t_el = dev["context"]["frames"].shape[1] - 1
    return jnp.repeat(dev["context"]["answers"], t_el, axis=0)

  # ---- meta-training -------------------------------------------------------------------------
  def encode_meta(self, model, params, raw):
    ctx, qry = raw["context"], raw["query"]
    enc = lambda x, m: model.apply({"params": params}, x, method=m)
    out = {"context": {"frames": enc(ctx["video"], model.encode_frames),
                       "answers": ctx["answers"]},
           "query": {"frames": enc(qry["video"], model.encode_frames),
                     "q": enc(qry["questions"], model.encode_question),
                     "answers": qry["answers"]}}
    if self.features:    # no question types: a context's label posteriors are its asked ones
      out["context"]["q"] = enc(ctx["questions"][..., 0, :], model.encode_question)
      for role, raw_role in (("context", ctx), ("query", qry)):
        out[role]["frame_mask"] = raw_role["frame_mask"]
    return out

  def meta_loss(self, model, params, query):
    """Every question type of every query video: frames [n, T, D], q [n, Q, Dq], answers
    [n, Q] -> (cross-entropy, accuracy)."""
    nq = query["q"].shape[1]
    frames = jnp.broadcast_to(query["frames"][:, None], (query["frames"].shape[0], nq)
                              + query["frames"].shape[1:])
    f = {"frames": frames, "q": query["q"]}
    if "frame_mask" in query:
      f["frame_mask"] = jnp.broadcast_to(query["frame_mask"][:, None],
                                         frames.shape[:2] + query["frame_mask"].shape[1:])
    logits = self.scores(model, params, f)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, query["answers"]).mean()
    return loss, (logits.argmax(-1) == query["answers"]).mean()

  def device_constants(self, model, params):
    return {} if self.features else {"type_q": self.type_question_codes(model, params)}

  def report_notes(self, cfg):
    if not self.features:
      return []
    return [self.source().describe() + " Accuracy counts every query question, those whose "
            "answer is outside the vocabulary as wrong."]
