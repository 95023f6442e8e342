"""A toy forward-only rival, added the way a user adds one: this module (a method family with
`build(ctx)`), an entry in config.method_families ("toy_rival") and its config block
(`config.toy_rival.temperatures`). Nothing in mmpg_jax/ names it.

It rescales the device model's scores by a temperature (validation picks it): no label, no
upload, no backward pass."""
from mmpg_jax.core.config_errors import need
from mmpg_jax.ondevice import costs
from mmpg_jax.training.methods import Method, Seen, grid


def validate_config(cfg, task, model, abstract_params) -> None:
  need(all(t > 0 for t in cfg.toy_rival.temperatures), "toy_rival.temperatures",
       cfg.toy_rival.temperatures, "temperatures > 0")


def build(ctx):
  def rescore(params, dev, hp, scores):
    return scores / hp["temperature"]

  return [Method("toy_rival", grid(temperature=tuple(ctx.config.toy_rival.temperatures)),
                 lambda params, dev, hp: params, lambda hp: costs.DeviceCost(),
                 rescore=rescore, role="rival",
                 seen=Seen(note="scores divided by a temperature chosen on validation"))]
