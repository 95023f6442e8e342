# Sourced by the launch scripts: make .venv from requirements.txt (and the data-only wheels of
# requirements-nodeps.txt) when it is missing or stale.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
STAMP=.venv/.requirements.sha256
want="$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[mmpg_jax] creating .venv from requirements.txt with $($PY --version) ..." >&2
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  # data-only wheels (MovieLens-100K inside recbole's): their files, not their dependencies
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  echo "$want" > "$STAMP"
fi
