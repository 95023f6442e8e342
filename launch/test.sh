#!/usr/bin/env bash
# The test suite (CPU, 8 simulated accelerators); creates .venv on first use.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=12 tests "$@"
