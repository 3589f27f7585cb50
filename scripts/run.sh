#!/usr/bin/env bash
# The README's main command: set up, train the `small` config on the Python standard library
# (about 10 minutes on a 2-core CPU), plot the training curve, print a sample.
# Extra arguments go to `looplm train`, e.g. `bash scripts/run.sh --set steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=runs/small-$(date +%Y%m%d-%H%M%S)
looplm train --config small --out "$OUT" "$@"
python -m looplm.train.plot "$OUT" "$OUT/curve.png"
echo "--- sample (looplm generate $OUT/latest) ---"
looplm generate "$OUT/latest" --prompt "def " --max-new-tokens 120 --temperature 0.8 --top-k 50 --seed 0
echo
