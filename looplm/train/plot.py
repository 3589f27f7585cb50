"""The training curve of a run as a PNG, from its ``metrics.jsonl``.

``python -m looplm.train.plot RUN_DIR [OUT.png]``: training loss and validation bits per
byte against wall-clock minutes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from looplm.errors import DataError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; give the --out directory of a looplm train run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """Write the curve of ``run_dir`` to ``out`` (default ``RUN_DIR/curve.png``); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r and not r.get("skipped")]
    val = [r for r in rows if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    # train loss (nats/token) in bits/byte, with the bytes per token of the validation split
    scale = val[-1]["val_bpb"] / val[-1]["val_loss"] if val else 1 / math.log(2)
    minutes = [r["elapsed_s"] / 60 for r in train]
    ax.plot(minutes, [r["loss"] * scale for r in train], label="train", alpha=0.7)
    if val:
        ax.plot([r["elapsed_s"] / 60 for r in val], [r["val_bpb"] for r in val], "o-", label="validation")
        ax.axhline(2.0, color="grey", lw=0.8, ls="--")
        last = val[-1]
        ax.annotate(f"{last['val_bpb']:.2f} bits/byte, {last['tokens'] / 1e6:.1f}M tokens",
                    (last["elapsed_s"] / 60, last["val_bpb"]), textcoords="offset points", xytext=(-150, 25))
    ax.set_xlabel("minutes")
    ax.set_ylabel("bits per byte")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curve.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot_run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
