#!/usr/bin/env bash
# Sets up ./.venv with the test extras on first use, then runs the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" dev,serve,ray,quant
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"
