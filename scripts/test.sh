#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, type-check, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check looplm tests
# type check: the whole package, strict on looplm/ops and looplm/layers ([tool.mypy] in pyproject.toml)
mypy looplm
python -m pytest -n 2 tests "$@"
