#!/usr/bin/env bash
# Install everything (with the test tools) and run the whole test suite; extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
