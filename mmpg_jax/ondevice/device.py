"""What methods run on a device, on features from the task's static encoders.

Because the encoders are static, encoding each sample once and adapting/evaluating the dynamic
part on the cached features is exactly what a device running the full model would compute
(`cached_features_valid` checks the premise). Everything here is task-generic: the task
supplies its objectives (`task.loss`, `task.entropy`) and posteriors.
"""
import jax
import jax.numpy as jnp
import optax

from mmpg_jax.core import params as P


def cached_features_valid(params, dynamic_leaves, encoder_prefixes):
  """Caching encoder outputs is exact only if no dynamic leaf lives in an encoder."""
  bad = [p for p in P.select(params, dynamic_leaves) if p.startswith(tuple(encoder_prefixes))]
  if bad:
    raise ValueError(
        f"dynamic_leaves select encoder leaves {bad}; the evaluation caches the outputs of the "
        f"static encoders {tuple(encoder_prefixes)} and needs them static. Select leaves after "
        f"the encoders.")


def device_key(seed, dev):
  """The per-device RNG key of a method's random draws: a function of the seed, the device id
  and, for a stream task's entries, the window (each window draws afresh)."""
  key = jax.random.fold_in(jax.random.key(seed), dev["device_id"])
  return jax.random.fold_in(key, dev["window"]) if "window" in dev else key


def objective(task, model, name: str):
  """`f(params, feats) -> scalar`: 'supervised' (the task's loss on labelled samples) or
  'entropy' (its unsupervised objective)."""
  if name == "supervised":
    return lambda p, f: task.loss(model, p, f)
  if name == "entropy":
    return lambda p, f: task.entropy(model, p, f)
  raise ValueError(f"unknown objective {name!r}; use 'supervised' or 'entropy'")


def make_optimizer(name: str, lr):
  if name == "sgd":
    return optax.sgd(lr)
  if name == "adam":
    return optax.adam(lr)
  raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")


def finetune_step(loss_fn, opt, static, dyn, opt_state, feats):
  """One on-device gradient step on the dynamic leaves (a backward pass)."""
  loss, grads = jax.value_and_grad(lambda d: loss_fn(P.merge(static, d), feats))(dyn)
  updates, opt_state = opt.update(grads, opt_state, dyn)
  return optax.apply_updates(dyn, updates), opt_state, loss


def finetune(loss_fn, params, leaves, feats, *, optimizer, lr, steps: int):
  """`steps` full-batch gradient steps of `loss_fn` on the leaves matched by `leaves`. Zero
  steps return `params` itself, with nothing traced (no backward pass is even built)."""
  if steps == 0:
    return params
  static, dyn = P.split(params, leaves)
  opt = make_optimizer(optimizer, lr)

  def body(carry, _):
    d, s = carry
    d, s, loss = finetune_step(loss_fn, opt, static, d, s, feats)
    return (d, s), loss

  (dyn, _), _ = jax.lax.scan(body, (dyn, opt.init(dyn)), None, length=steps)
  return P.merge(static, dyn)


def em_prior(probs, source_prior, iterations: int, smoothing):
  """Saerens et al. (2002) EM re-estimation of the target label prior from unlabelled
  posteriors `probs` [n, A] of a model trained under `source_prior` [A]. `smoothing` adds
  that many pseudo-samples of the source prior (a Dirichlet prior), which keeps a 32-sample
  estimate from collapsing onto a few labels. The loop is unrolled (static `iterations`), so
  XLA's cost analysis counts every iteration."""
  n = probs.shape[0]
  prior = source_prior
  for _ in range(iterations):
    w = probs * (prior / source_prior)
    post = w / w.sum(-1, keepdims=True)
    prior = (post.sum(0) + smoothing * source_prior) / (n + smoothing)
  return prior


def label_shift_ratio(posteriors, source_prior, groups, *, iterations: int, smoothing):
  """log(target prior / source prior) per label, by EM on a device's unlabelled samples.
  `posteriors` [n, G, A]: label group g's posteriors on every sample (the task's
  `label_posteriors`); each group's prior is re-estimated from its own softmax."""
  ratio = jnp.zeros(source_prior.shape[0])
  for g, (lo, hi) in enumerate(groups):
    s = source_prior[lo:hi] / source_prior[lo:hi].sum()
    p = posteriors[:, g, lo:hi]
    p = p / p.sum(-1, keepdims=True)
    prior = em_prior(p, s, iterations, smoothing)
    ratio = ratio.at[lo:hi].set(jnp.log(jnp.maximum(prior, 1e-6)) - jnp.log(s))
  return ratio


def label_shift_correction(task, model, params, dev, source_prior, *, iterations: int,
                           smoothing, scale):
  """`params` with the task's label bias moved by scale x the EM log prior ratio of every label
  group asked of the device's context (forward passes only): prior_em, and cdc_mmpg_em2 on
  the edited model."""
  ratio = label_shift_ratio(task.label_posteriors(model, params, dev), source_prior,
                            task.label_groups, iterations=iterations, smoothing=smoothing)
  return P.apply_edit(params, P.unflatten({task.label_bias_leaf: scale * ratio}))
