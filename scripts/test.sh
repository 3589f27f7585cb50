#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check looplm tests
python -m pytest -n 2 tests "$@"
