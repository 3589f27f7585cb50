"""Perplexity of an attention checkpoint linearised (Liger GLA, one attention layer in four, a 64-token
window) with and without the normalised read-out, before any fine-tuning, at several scoring windows.

    python scripts/liger_norm_check.py CKPT [--text FILE] [--tokens 1024]

The unnormalised model degrades as the window grows (its recurrent output grows with the context);
the normalised one does not. docs/mechanisms.md §1.4 quotes this on SmolLM2-135M.
"""

from __future__ import annotations

import argparse

import torch

from looplm.checkpoint import load_model
from looplm.convert.linearize import linearize
from looplm.data.tokenizer import load_tokenizer
from looplm.perplexity import score_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    base = load_model(args.checkpoint).eval()
    with open(args.text, encoding="utf-8") as f:
        ids = torch.tensor(load_tokenizer(args.checkpoint).encode(f.read())[:args.tokens + 1])
    windows = [w for w in (64, 256, 1024) if w <= args.tokens]
    with torch.no_grad():
        print("original", *(f"{score_tokens(base, ids, window=w).perplexity:.1f}" for w in windows))
        for normalize in (False, True):
            model = linearize(base, "gla", 4, 64, normalize=normalize).eval()
            ppl = [f"{score_tokens(model, ids, window=w).perplexity:.1f}" for w in windows]
            print("normalised" if normalize else "unnormalised", *ppl, f"(windows {windows})")


if __name__ == "__main__":
    main()
