#!/usr/bin/env bash
# Run the side-by-side benchmark: bash bench/run.sh [--quick] [--only W1,W3] [--peers fastdist,mp,...]
set -eu
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/setup_env.sh"
exec "$HERE/.venv/bin/python" "$HERE/run.py" "$@"
