#!/usr/bin/env bash
# Install what the test suite needs (system services, the package, test tools) and run it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/services/install.sh
python -m pip install --quiet --disable-pip-version-check ".[test]"
exec python -m pytest -p no:cacheprovider "$@"
