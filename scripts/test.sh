#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, type-check, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check looplm tests
# type check: strict on looplm/ops ([tool.mypy] in pyproject.toml); the rest of the package is not clean yet
mypy looplm/ops
python -m pytest -n 2 tests "$@"
