#!/usr/bin/env bash
# Create .venv (if missing) and install looplm with its test extras.
# torch is pinned to 2.13.0, the CPU build this machine kind keeps on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
python -c "import looplm, torch; print('looplm', looplm.__version__, 'torch', torch.__version__)"
# build the C++ kernels now (seconds, cached) rather than at the first training step
python -c "from looplm.ops.cpp_ext import available; print('C++ kernels:', available())"
