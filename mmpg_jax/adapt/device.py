"""What every method runs on a device, on features from the static encoders.

A device's data for adaptation is a dict of roles; each role holds `frames` [n, T, D] (the
static frame encoder's output), `q` [n, Dq] (the static question encoder's output), `qtype`,
and `answer` where the role is labelled. Because the encoders are static, encoding each video
once and adapting/evaluating the dynamic part on the cached features is exactly what a device
running the full model would compute (`cached_features_valid` checks the premise).
"""
import jax
import jax.numpy as jnp
import optax

from mmpg_jax import params as P


def cached_features_valid(params, dynamic_leaves, encoder_prefixes=("frame_encoder/",
                                                                     "question_encoder/")):
  """Caching encoder outputs is exact only if no dynamic leaf lives in an encoder."""
  bad = [p for p in P.select(params, dynamic_leaves) if p.startswith(encoder_prefixes)]
  if bad:
    raise ValueError(
        f"dynamic_leaves select encoder leaves {bad}; the evaluation caches encoder outputs "
        f"and needs the encoders static. Select leaves after the encoders (temporal/, fusion/, "
        f"answer_head/).")


def encode(model, params, video, question):
  """Static encoders: video [n,T,H,W] uint8, question [n,L] -> {'frames', 'q'}."""
  frames = model.apply({"params": params}, video, method=model.encode_frames)
  q = model.apply({"params": params}, question, method=model.encode_question)
  return {"frames": frames, "q": q}


def logits(model, params, feats):
  return model.apply({"params": params}, feats["frames"], feats["q"],
                     method=model.answer_from_features)


def accuracy(model, params, feats):
  return (logits(model, params, feats).argmax(-1) == feats["answer"]).mean()


def _ce(model, params, feats):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits(model, params, feats), feats["answer"]).mean()


def _entropy(model, params, feats):
  lp = jax.nn.log_softmax(logits(model, params, feats))
  return -(jnp.exp(lp) * lp).sum(-1).mean()


OBJECTIVES = {"cross_entropy": _ce, "entropy": _entropy}


def make_optimizer(name: str, lr):
  if name == "sgd":
    return optax.sgd(lr)
  if name == "adam":
    return optax.adam(lr)
  raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")


def finetune_step(model, objective, opt, static, dyn, opt_state, feats):
  """One on-device gradient step on the dynamic leaves (a backward pass)."""
  loss_fn = lambda d: OBJECTIVES[objective](model, P.merge(static, d), feats)
  loss, grads = jax.value_and_grad(loss_fn)(dyn)
  updates, opt_state = opt.update(grads, opt_state, dyn)
  return optax.apply_updates(dyn, updates), opt_state, loss


def finetune(model, params, leaves, feats, *, objective, optimizer, lr, steps: int):
  """`steps` full-batch gradient steps on the leaves matched by `leaves`; returns params."""
  static, dyn = P.split(params, leaves)
  opt = make_optimizer(optimizer, lr)

  def body(carry, _):
    d, s = carry
    d, s, loss = finetune_step(model, objective, opt, static, d, s, feats)
    return (d, s), loss

  (dyn, _), _ = jax.lax.scan(body, (dyn, opt.init(dyn)), None, length=steps)
  return P.merge(static, dyn)


def em_prior(probs, source_prior, iterations: int, smoothing):
  """Saerens et al. (2002) EM re-estimation of the target label prior from unlabelled
  posteriors `probs` [n, A] of a model trained under `source_prior` [A]. `smoothing` adds
  that many pseudo-samples of the source prior (a Dirichlet prior), which keeps a 32-sample
  estimate from collapsing onto a few answers. The loop is unrolled (static `iterations`), so
  XLA's cost analysis counts every iteration."""
  n = probs.shape[0]
  prior = source_prior
  for _ in range(iterations):
    w = probs * (prior / source_prior)
    post = w / w.sum(-1, keepdims=True)
    prior = (post.sum(0) + smoothing * source_prior) / (n + smoothing)
  return prior


def type_posteriors(model, params, frames, type_q):
  """Posteriors for every question type on each video: frames [n, T, D], type_q [Q, Dq]
  (one canonical question per type) -> [n, Q, A]. Forward passes only."""
  n, nq = frames.shape[0], type_q.shape[0]
  f = jnp.broadcast_to(frames[:, None], (n, nq) + frames.shape[1:])
  q = jnp.broadcast_to(type_q[None], (n,) + type_q.shape)
  return jax.nn.softmax(logits(model, params, {"frames": f, "q": q}))


def label_shift_ratio(model, params, frames, type_q, source_prior, groups, *, iterations: int,
                      smoothing):
  """log(target prior / source prior) per answer, by EM on the device's unlabelled videos,
  each answer group (question type) estimated from the posteriors of its own question asked
  of every video."""
  post = type_posteriors(model, params, frames, type_q)
  ratio = jnp.zeros(source_prior.shape[0])
  for g, (lo, hi) in enumerate(groups):
    s = source_prior[lo:hi] / source_prior[lo:hi].sum()
    p = post[:, g, lo:hi]
    p = p / p.sum(-1, keepdims=True)
    prior = em_prior(p, s, iterations, smoothing)
    ratio = ratio.at[lo:hi].set(jnp.log(jnp.maximum(prior, 1e-6)) - jnp.log(s))
  return ratio
