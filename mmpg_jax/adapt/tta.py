"""Forward-only test-time adaptation rivals: T3A, LAME and an FOA-style search, written once for every task whose
scores are a linear classifier of features (`task.classifier_features`, `task.classifier_layer`).

* T3A (Iwasawa & Matsuo, NeurIPS 2021): the last layer's weights become class prototypes. The
  supports start as the classifier's own weight vectors and gain the device's unlabelled
  context features under their pseudo-labels; per class only the `filter_k` lowest-entropy
  supports are kept (0: all); the new kernel is the normalised sum of the normalised supports,
  the bias zero (scores = z @ normalize(W')), as in the official DomainBed code. On a task with
  label groups (QA: a question type's answers) a context sample is pseudo-labelled, and its
  entropy taken, within the group of the question asked of it (`task.asked_groups`), and a
  class's warm-up support belongs to its own group, so a digit question never lends a sample
  to a direction prototype. `bias`: "zero" (T3A's) or "keep" (the trained bias, which on a
  shared answer vocabulary also separates the groups), chosen on validation. An edit of the
  classifier layer: one forward pass over the context, no labels, no backward pass.
* LAME (Boudiaf et al., CVPR 2022): the predictions of the batch the device is asked to predict
  (its query inputs, never their labels) are corrected by Laplacian-regularised maximum
  likelihood, z = argmin sum_i KL(z_i || p_i) - lambda sum_ij w_ij z_i.z_j, with w the kNN
  affinity of the L2-normalised features, solved by the paper's bound updates
  z_i <- softmax(log p_i + lambda sum_j w_ij z_j). The model is not changed (a `rescore`).

* FOA (Niu et al., ICML 2024, "Test-time model adaptation with only forward passes"): CMA-ES
  (evosax) over a small parameter offset (`tta.foa.leaves`, e.g. the answer bias and a
  LayerNorm offset; FOA itself searches input prompts of a ViT), each candidate scored on the
  device's unlabelled context by its fitness, entropy + `stat_weight` x the activation
  discrepancy summed over the layers the search can move (`task.activation_layers`: QA's
  fusion output and answer-head hidden layer), per layer ||mu - mu_src||_2 + ||sd - sd_src||_2
  as the paper writes it. The source statistics are the paper's: a few in-distribution
  unlabelled samples, here the validation devices' unlabelled contexts, never a test device.
  Then FOA's back-to-source activation shifting: the last layer's input moved by
  `shift` x (mu_src - mu_device) (the device's context mean after the search), which for a
  linear last layer is exactly an edit of its bias, shift x (mu_src - mu_device) @ W.
  `stat_weight` (a log grid), `iterations` and `shift` are chosen on validation. Forward passes
  only, population x iterations of them: the cost table shows it.

All are selected on validation devices like every method (grids in `config.tta`).
"""
import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES

from mmpg_jax.core import params as P
from mmpg_jax.core.config_errors import need, positive
from mmpg_jax.ondevice import costs, device
from mmpg_jax.tasks.capabilities import LinearHead, ScoredContext
from mmpg_jax.training.methods import Method, grid


def _unit(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def group_mask(groups, group_of_sample, num_classes):
  """[n + A, A] answers each support may be labelled with: the warm-up support of class a its
  own group's, context sample i the group asked of it (`groups`: ((lo, hi), ...))."""
  of_class = jnp.zeros(num_classes, jnp.int32)
  for g, (lo, hi) in enumerate(groups):
    of_class = of_class.at[lo:hi].set(g)
  group = jnp.concatenate([of_class, group_of_sample.astype(jnp.int32)])
  return group[:, None] == of_class[None, :]


def t3a_kernel(z, kernel, bias, filter_k: int, allowed=None):
  """T3A's prototype classifier: context features z [n, H], the classifier's kernel [H, A] and
  bias [A] -> the adjusted kernel [H, A] (used with a zero bias). `allowed` [A + n, A]: the
  answers each support (warm-up first) may be pseudo-labelled with (None: all)."""
  num_classes = kernel.shape[1]
  supports = jnp.concatenate([kernel.T, z])                    # warm-up supports first
  logits = supports @ kernel + bias
  if allowed is not None:
    logits = jnp.where(allowed, logits, -jnp.inf)
  labels = logits.argmax(-1)
  logp = jax.nn.log_softmax(logits)
  ent = -jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0).sum(-1)
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

  groups = tuple(task.label_groups or ())

  def adapt(params, dev, hp):
    flat = P.flatten(params)
    w, b = flat[f"{layer}/kernel"], flat[f"{layer}/bias"]
    context = dev[task.context_role]
    z = task.classifier_features(model, params, context)
    asked = task.asked_groups(context) if len(groups) > 1 else None
    allowed = None if asked is None else group_mask(groups, asked, w.shape[1])
    flat[f"{layer}/kernel"] = t3a_kernel(z, w, b, hp["filter_k"], allowed)
    if hp["bias"] == "zero":
      flat[f"{layer}/bias"] = jnp.zeros_like(b)
    return P.unflatten(flat)

  feats = task.example_features(model, ctx.params, n)

  def cost(hp):
    dev = {task.context_role: feats}
    return costs.DeviceCost(device_flops=cm.encode(n) + costs.flops(
        lambda p, d: adapt(p, d, hp), ctx.params, dev))

  return Method("t3a", grid(filter_k=tuple(cfg.tta.t3a.filter_k),
                           bias=tuple(cfg.tta.t3a.bias)), adapt, cost,
                uses=(task.context_role,), role="rival")


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
                role="rival")


def feature_stats(feats):
  """Mean and std over samples of [n, H] features: FOA's activation statistics."""
  return feats.mean(0), feats.std(0)


def source_statistics(task, model, params, contexts):
  """[(mu, sd) per activation layer] over every sample of the stacked `contexts` [D, n, ...]."""
  layers = jax.vmap(lambda c: task.activation_layers(model, params, c))(contexts)
  return [feature_stats(jnp.asarray(a).reshape((-1, a.shape[-1]))) for a in layers]


def discrepancy(layers, source):
  """FOA's activation discrepancy: sum over layers of ||mu - mu_s||_2 + ||sd - sd_s||_2."""
  out = 0.0
  for a, (mu_s, sd_s) in zip(layers, source):
    mu, sd = feature_stats(a)
    out += jnp.linalg.norm(mu - mu_s) + jnp.linalg.norm(sd - sd_s)
  return out


def foa_fitness(task, model, params, offset_tree, context, source, stat_weight):
  """Entropy on the context + stat_weight x the activation discrepancy to the source."""
  p = P.apply_edit(params, offset_tree)
  ent = task.entropy(model, p, context)
  return ent + stat_weight * discrepancy(task.activation_layers(model, p, context), source)


def activation_shift(task, model, params, context, source_last, shift):
  """FOA's back-to-source shifting of the last layer's input, z + shift (mu_s - mu_device), as
  the equivalent edit of the last layer's bias."""
  layer = task.classifier_layer
  mu = task.classifier_features(model, params, context).mean(0)
  kernel = P.flatten(params)[f"{layer}/kernel"]
  return P.apply_edit(params, P.unflatten(
      {f"{layer}/bias": shift * (source_last[0] - mu) @ kernel}))


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

  # The cloud's activation statistics, from in-distribution unlabelled contexts (validation).
  source = source_statistics(task, model, ctx.params, ctx.val[task.context_role])

  def adapt(params, dev, hp):
    context = dev[task.context_role]
    fit = lambda x: foa_fitness(task, model, params, offsets(x), context, source,
                                hp["stat_weight"])
    key = device.device_key(cfg.seed, dev)
    x = cma_search(fit, sum(sizes), key, population=fc.population,
                   iterations=hp["iterations"], std_init=hp["std_init"])
    searched = P.apply_edit(params, offsets(x))
    return activation_shift(task, model, searched, context, source[-1], hp["shift"])

  example = task.example_features(model, ctx.params, n)

  def cost(hp):
    # One candidate's forward pass and score, x population x iterations (XLA counts a loop
    # body once, so the count is composed here), + encoding the context once + the shift.
    one = costs.flops(lambda p, c, x: foa_fitness(task, model, p, offsets(x), c, source, 1.0),
                      ctx.params, example, jnp.zeros(sum(sizes)))
    shift = costs.flops(lambda p, c: activation_shift(task, model, p, c, source[-1], 1.0),
                        ctx.params, example)
    return costs.DeviceCost(device_flops=cm.encode(n) + fc.population * hp["iterations"] * one
                            + shift)

  return Method("foa", grid(std_init=tuple(fc.std_init), stat_weight=tuple(fc.stat_weight),
                            iterations=tuple(int(i) for i in fc.iterations),
                            shift=tuple(fc.shift)),
                adapt, cost, uses=(task.context_role,),
                role="rival", info={"searched_parameters": sum(sizes),
                      "population": fc.population,
                      "activation_layers": len(source)})


# The rivals by name, in the report's order (config.tta.include picks among them).
RIVALS = {"t3a": t3a, "lame": lame_method, "foa": foa}


def validate_config(cfg, task, model, abstract_params) -> None:
  inc = tuple(cfg.tta.include)
  need(inc and set(inc) <= set(RIVALS), "tta.include", inc,
       f"a non-empty subset of {tuple(RIVALS)}")
  for k in cfg.tta.t3a.filter_k:
    need(isinstance(k, int) and k >= 0, "tta.t3a.filter_k", cfg.tta.t3a.filter_k,
         "supports kept per class: integers >= 0 (0 keeps all)")
  need(set(cfg.tta.t3a.bias) <= {"zero", "keep"} and len(cfg.tta.t3a.bias) > 0,
       "tta.t3a.bias", cfg.tta.t3a.bias, "a non-empty subset of ('zero', 'keep')")
  for key in ("tta.lame.knn", "tta.lame.bound_lambda", "tta.lame.iterations"):
    positive(cfg, key)
  need(max(cfg.tta.lame.knn) < cfg.data.query_size, "tta.lame.knn", cfg.tta.lame.knn,
       f"neighbours must be fewer than the {cfg.data.query_size} query samples LAME corrects")
  for key in ("tta.foa.population", "tta.foa.std_init"):
    positive(cfg, key)
  need(len(cfg.tta.foa.iterations) > 0 and all(isinstance(i, int) and i > 0
                                               for i in cfg.tta.foa.iterations),
       "tta.foa.iterations", cfg.tta.foa.iterations, "a tuple of generation counts > 0")
  need(all(x >= 0 for x in cfg.tta.foa.shift), "tta.foa.shift", cfg.tta.foa.shift,
       "activation-shift strengths >= 0 (0 = no shift)")
  need(cfg.tta.foa.population >= 4, "tta.foa.population", cfg.tta.foa.population,
       "CMA-ES needs at least 4 candidates per generation")
  need(all(w >= 0 for w in cfg.tta.foa.stat_weight), "tta.foa.stat_weight",
       cfg.tta.foa.stat_weight, "weights must be >= 0")
  if isinstance(task, LinearHead):
    layer = task.classifier_layer
    P.select(abstract_params, [f"{layer}/kernel", f"{layer}/bias"])
    P.select(abstract_params, cfg.tta.foa.leaves)


def build(ctx):
  """T3A, LAME and FOA for tasks with a linear classifier on top (none otherwise: retrieval ranks a
  gallery and has no classes; FOA also needs an entropy on the context)."""
  if not isinstance(ctx.task, LinearHead):
    return []
  scored = isinstance(ctx.task, ScoredContext)
  return [make(ctx) for name, make in RIVALS.items() if name in ctx.config.tta.include
          and (scored or name != "foa")]
