#!/usr/bin/env bash
# Runs an mmpg_jax module on a Cloud TPU VM worker; call it on every worker of a pod slice:
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command \
#     "cd mmpg_jax && bash launch/tpu_vm.sh mmpg_jax.generate --config=... --workdir=... --num_devices=..."
# MODULE (first argument, optional): mmpg_jax.main (default), mmpg_jax.generate, mmpg_jax.bench.
# Idempotent: .venv is made from requirements.txt only when missing or stale (launch/_venv.sh),
# and jax[tpu] at the venv's pinned jax version only when that venv has not had it yet; a rerun
# goes straight to the module. MMPG_DISTRIBUTED=1 makes the module call
# jax.distributed.initialize(), which finds the pod's coordinator from the TPU metadata.
# Data and workdirs on GCS: mount the bucket with gcsfuse and point MMPG_DATA_DIR and
# --workdir/--out into the mount (WORKSPACE.md, "Cloud TPU").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
jax_version="$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
stamp=.venv/.jax_tpu
want="jax[tpu]==$jax_version $(cat .venv/.requirements.sha256)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[mmpg_jax] installing jax[tpu]==$jax_version ..." >&2
  .venv/bin/pip install --quiet --disable-pip-version-check "jax[tpu]==$jax_version"
  echo "$want" > "$stamp"
fi
module=mmpg_jax.main
if [[ $# -gt 0 && "$1" == mmpg_jax.* ]]; then
  module="$1"
  shift
fi
export MMPG_DISTRIBUTED=1
exec .venv/bin/python -m "$module" "$@"
