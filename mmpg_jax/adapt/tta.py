"""Forward-only test-time adaptation rivals: T3A, LAME and an FOA-style search, written once for every task whose
scores are a linear classifier of features (`task.classifier_features`, `task.classifier_layer`).

* T3A (Iwasawa & Matsuo, NeurIPS 2021): the last layer's weights become class prototypes. The
  supports start as the classifier's own weight vectors and gain the device's unlabelled
  context features under their pseudo-labels; per class only the `filter_k` lowest-entropy
  supports are kept (0: all); the new kernel is the normalised sum of the normalised supports,
  the bias zero (scores = z @ normalize(W')), as in the official DomainBed code. An edit of the
  classifier layer: one forward pass over the context, no labels, no backward pass.
* LAME (Boudiaf et al., CVPR 2022): the predictions of the batch the device is asked to predict
  (its query inputs, never their labels) are corrected by Laplacian-regularised maximum
  likelihood, z = argmin sum_i KL(z_i || p_i) - lambda sum_ij w_ij z_i.z_j, with w the kNN
  affinity of the L2-normalised features, solved by the paper's bound updates
  z_i <- softmax(log p_i + lambda sum_j w_ij z_j). The model is not changed (a `rescore`).

* FOA-style search (after Niu et al., ICML 2024, "Test-time model adaptation with only forward
  passes"): CMA-ES (evosax) over a small parameter offset (`tta.foa.leaves`, e.g. the answer
  bias and a LayerNorm offset; FOA itself searches input prompts), each candidate scored on the
  device's unlabelled context by entropy plus `stat_weight` x the distance of the context's
  classifier-feature mean and std to the cloud's (FOA's source statistics, which the paper takes
  from a few in-distribution unlabelled samples: here the validation devices' unlabelled
  contexts, never a test device). Forward passes only, population x iterations of them: the
  cost table shows it. FOA's final activation shifting is not reproduced.

All are selected on validation devices like every method (grids in `config.tta`).
"""
import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES

from mmpg_jax import costs, device
from mmpg_jax import params as P
from mmpg_jax.config_errors import need, positive
from mmpg_jax.methods import Method, grid


def _unit(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def t3a_kernel(z, kernel, bias, filter_k: int):
  """T3A's prototype classifier: context features z [n, H], the classifier's kernel [H, A] and
  bias [A] -> the adjusted kernel [H, A] (used with a zero bias)."""
  num_classes = kernel.shape[1]
  supports = jnp.concatenate([kernel.T, z])                    # warm-up supports first
  logits = supports @ kernel + bias
  labels = logits.argmax(-1)
  logp = jax.nn.log_softmax(logits)
  ent = -(jnp.exp(logp) * logp).sum(-1)
  onehot = jax.nn.one_hot(labels, num_classes)
  if filter_k > 0:
    # Rank of each support's entropy among supports of its class (ties by position).
    idx = jnp.arange(len(labels))
    before = (ent[None, :] < ent[:, None]) | ((ent[None, :] == ent[:, None])
                                                & (idx[None, :] < idx[:, None]))
    rank = ((labels[None, :] == labels[:, None]) & before).sum(1)
    onehot = onehot * (rank < filter_k)[:, None]
  return _unit(_unit(supports).T @ onehot, axis=0)


def knn_affinity(feats, knn: int):
  """w_ij = 1 if j is among i's knn nearest other samples (L2 on unit features), else 0."""
  x = _unit(feats)
  d = jnp.sum(jnp.square(x[:, None] - x[None]), -1) + jnp.eye(len(x)) * 1e9   # not itself
  k = min(knn, len(x) - 1)
  _, nearest = jax.lax.top_k(-d, k)
  return jnp.zeros_like(d).at[jnp.arange(len(x))[:, None], nearest].set(1.0)


def lame_step(log_p, w, y, bound_lambda):
  return jax.nn.softmax(log_p + bound_lambda * (w @ y), -1)


def lame(log_p, w, bound_lambda, iterations: int):
  """LAME's bound updates from y = p; returns log of the corrected assignment."""
  y = jax.lax.fori_loop(0, iterations, lambda _, y: lame_step(log_p, w, y, bound_lambda),
                        jnp.exp(log_p))
  return jnp.log(jnp.maximum(y, 1e-30))


def t3a(ctx):
  task, model, cm, cfg = ctx.task, ctx.model, ctx.cost_model, ctx.config
  layer = task.classifier_layer
  n = cfg.data.context_size

  def adapt(params, dev, hp):
    flat = P.flatten(params)
    w, b = flat[f"{layer}/kernel"], flat[f"{layer}/bias"]
    z = task.classifier_features(model, params, dev[task.context_role])
    flat[f"{layer}/kernel"] = t3a_kernel(z, w, b, hp["filter_k"])
    flat[f"{layer}/bias"] = jnp.zeros_like(b)
    return P.unflatten(flat)

  feats = task.example_features(model, ctx.params, n)

  def cost(hp):
    dev = {task.context_role: feats}
    return costs.DeviceCost(device_flops=cm.encode(n) + costs.flops(
        lambda p, d: adapt(p, d, hp), ctx.params, dev))

  return Method("t3a", grid(filter_k=tuple(cfg.tta.t3a.filter_k)), adapt, cost,
                uses=(task.context_role,), info={"rival": True})


def lame_method(ctx):
  task, model, cfg = ctx.task, ctx.model, ctx.config
  lc = cfg.tta.lame
  n = cfg.data.query_size

  def rescore(params, dev, hp, scores):
    feats = task.classifier_features(model, params, dev[task.query_role])
    w = knn_affinity(feats, hp["knn"])
    return lame(jax.nn.log_softmax(scores), w, hp["bound_lambda"], lc.iterations)

  feats = task.example_features(model, ctx.params, n)
  num_classes = P.flatten(ctx.params)[f"{task.classifier_layer}/bias"].shape[0]

  def cost(hp):
    # The query's forward pass is inference (not counted); its features are re-read here. XLA
    # counts a loop body once, so the bound updates are counted step x iterations.
    affinity = costs.flops(lambda p, f: knn_affinity(task.classifier_features(model, p, f),
                                                     hp["knn"]), ctx.params, feats)
    y = jnp.full((n, num_classes), 1.0 / num_classes)
    step = costs.flops(lambda lp, w, y: lame_step(lp, w, y, 1.0), jnp.log(y),
                       jnp.zeros((n, n)), y)
    return costs.DeviceCost(device_flops=affinity + lc.iterations * step)

  return Method("lame", grid(knn=tuple(lc.knn), bound_lambda=tuple(lc.bound_lambda)),
                lambda params, dev, hp: params, cost, uses=(), rescore=rescore,
                info={"rival": True})


def feature_stats(feats):
  """Mean and std over samples of [n, H] features: FOA's activation statistics."""
  return feats.mean(0), feats.std(0)


def foa_fitness(task, model, params, leaves, offset_tree, context, source_stats, stat_weight):
  """Entropy on the context + stat_weight x mean-squared distance of feature statistics."""
  p = P.apply_edit(params, offset_tree)
  ent = task.entropy(model, p, context)
  mu, sd = feature_stats(task.classifier_features(model, p, context))
  mu_s, sd_s = source_stats
  return ent + stat_weight * (jnp.mean(jnp.square(mu - mu_s)) + jnp.mean(jnp.square(sd - sd_s)))


def cma_search(fitness, dim: int, key, *, population: int, iterations: int, std_init):
  """CMA-ES (evosax) from the zero vector: `fitness(x [dim]) -> scalar`, minimised over
  `iterations` generations of `population` candidates; returns the final mean."""
  es = CMA_ES(population_size=population, solution=jnp.zeros(dim))
  hp = es.default_params.replace(std_init=std_init)
  state = es.init(key, jnp.zeros(dim), hp)

  def generation(state, k):
    k_ask, k_tell = jax.random.split(k)
    pop, state = es.ask(k_ask, state, hp)
    state, _ = es.tell(k_tell, pop, jax.vmap(fitness)(pop), state, hp)
    return state, None

  state, _ = jax.lax.scan(generation, state, jax.random.split(key, iterations))
  return es.get_mean(state)


def foa(ctx):
  task, model, cm, cfg = ctx.task, ctx.model, ctx.cost_model, ctx.config
  fc = cfg.tta.foa
  n = cfg.data.context_size
  paths = P.select(ctx.params, fc.leaves)
  flat = P.flatten(ctx.params)
  shapes = [flat[p].shape for p in paths]
  sizes = [int(np.prod(s)) for s in shapes]

  def offsets(x):
    parts = jnp.split(x, np.cumsum(sizes)[:-1])
    return P.unflatten({p: v.reshape(s) for p, v, s in zip(paths, parts, shapes)})

  # The cloud's feature statistics, from in-distribution unlabelled contexts (validation).
  val_ctx = ctx.val[task.context_role]
  feats = jax.vmap(lambda c: task.classifier_features(model, ctx.params, c))(val_ctx)
  source = feature_stats(jnp.asarray(feats).reshape((-1, feats.shape[-1])))

  def adapt(params, dev, hp):
    context = dev[task.context_role]
    fit = lambda x: foa_fitness(task, model, params, paths, offsets(x), context, source,
                                hp["stat_weight"])
    key = device.device_key(cfg.seed, dev)
    x = cma_search(fit, sum(sizes), key, population=fc.population, iterations=fc.iterations,
                   std_init=hp["std_init"])
    return P.apply_edit(params, offsets(x))

  example = task.example_features(model, ctx.params, n)

  def cost(hp):
    # One candidate's forward pass and score, x population x iterations (XLA counts a loop
    # body once, so the count is composed here), + encoding the context once.
    one = costs.flops(lambda p, c, x: foa_fitness(task, model, p, paths, offsets(x), c, source,
                                                  1.0), ctx.params, example,
                      jnp.zeros(sum(sizes)))
    return costs.DeviceCost(device_flops=cm.encode(n) + fc.population * fc.iterations * one)

  return Method("foa", grid(std_init=tuple(fc.std_init), stat_weight=tuple(fc.stat_weight)),
                adapt, cost, uses=(task.context_role,),
                info={"rival": True, "searched_parameters": sum(sizes),
                      "forward_passes": fc.population * fc.iterations})


# The rivals by name, in the report's order (config.tta.include picks among them).
RIVALS = {"t3a": t3a, "lame": lame_method, "foa": foa}


def validate_config(cfg, task, model, abstract_params) -> None:
  inc = tuple(cfg.tta.include)
  need(inc and set(inc) <= set(RIVALS), "tta.include", inc,
       f"a non-empty subset of {tuple(RIVALS)}")
  for k in cfg.tta.t3a.filter_k:
    need(isinstance(k, int) and k >= 0, "tta.t3a.filter_k", cfg.tta.t3a.filter_k,
         "supports kept per class: integers >= 0 (0 keeps all)")
  for key in ("tta.lame.knn", "tta.lame.bound_lambda", "tta.lame.iterations"):
    positive(cfg, key)
  need(max(cfg.tta.lame.knn) < cfg.data.query_size, "tta.lame.knn", cfg.tta.lame.knn,
       f"neighbours must be fewer than the {cfg.data.query_size} query samples LAME corrects")
  for key in ("tta.foa.population", "tta.foa.iterations", "tta.foa.std_init"):
    positive(cfg, key)
  need(cfg.tta.foa.population >= 4, "tta.foa.population", cfg.tta.foa.population,
       "CMA-ES needs at least 4 candidates per generation")
  need(all(w >= 0 for w in cfg.tta.foa.stat_weight), "tta.foa.stat_weight",
       cfg.tta.foa.stat_weight, "weights must be >= 0")
  if hasattr(task, "classifier_features"):
    layer = task.classifier_layer
    P.select(abstract_params, [f"{layer}/kernel", f"{layer}/bias"])
    P.select(abstract_params, cfg.tta.foa.leaves)


def build(ctx):
  """T3A, LAME and FOA for tasks with a linear classifier on top (none otherwise: retrieval ranks a
  gallery and has no classes)."""
  if not hasattr(ctx.task, "classifier_features"):
    return []
  return [make(ctx) for name, make in RIVALS.items() if name in ctx.config.tta.include]
