"""The protocol every method family is built and judged under: the Method interface
(methods), config checks before any work (config_checks), the stage loop and the global model
(train), what meta-training stages share (meta_train), selection on validation devices and
evaluation (evaluate), simulated devices (simulate) and reading a finished run back (runs)."""
