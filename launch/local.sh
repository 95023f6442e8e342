#!/usr/bin/env bash
# The main job on the embedded benchmark; creates .venv on first use. Extra flags pass through:
#   bash launch/local.sh --config=configs/moving_digits_qa.py:smoke --workdir=/tmp/smoke
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
args=("$@")
[[ " ${args[*]-} " == *" --config="* ]] || args=(--config=configs/moving_digits_qa.py "${args[@]}")
[[ " ${args[*]-} " == *" --workdir="* ]] || args+=(--workdir=runs/default)
exec .venv/bin/python -m mmpg_jax.main "${args[@]}"
