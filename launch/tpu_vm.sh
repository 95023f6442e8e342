#!/usr/bin/env bash
# Run on every worker of a Cloud TPU VM (single or multi-host), e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command \
#     "cd mmpg_jax && bash launch/tpu_vm.sh --config=configs/moving_digits_qa.py --workdir=gs://..."
# Installs jax[tpu] at the pinned version on top of requirements.txt, then runs the main job.
# On a pod slice JAX's own runtime connects the hosts (jax.distributed.initialize() finds the
# coordinator from the TPU metadata); nothing else is needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet -r requirements.txt
.venv/bin/pip install --quiet "jax[tpu]==0.10.2"
export MMPG_DISTRIBUTED=1
exec .venv/bin/python -m mmpg_jax.main "$@"
