#!/usr/bin/env bash
# Sets up ./.venv on first use, then runs the kinema CLI with the given arguments.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" >&2
exec "$root/.venv/bin/kinema" "$@"
