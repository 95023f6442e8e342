"""mmpg_jax: backpropagation-free cloud-device collaborative adaptation in JAX.

See WORKSPACE.md for the layout and the vocabulary (device model, static/dynamic leaves,
edit, anchors, ADR, FDA, prototype, global, FTA, TENT, oracle).
"""
