"""``looplm info CHECKPOINT``: parameters (unique and with reuse), the bytes the weights take (per
quantised format, its bits per weight), FLOPs per token, config, and the
implementation each layer decodes with (:func:`looplm.layers.layer_step.describe`), or the one C++
call a whole decoding step takes (:func:`looplm.layers.layer_step.stack_plan`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from looplm.checkpoint import load_model
from looplm.errors import CheckpointError
from looplm.layers.layer_step import describe, stack_plan
from looplm.model import LoopLM
from looplm.quant.linear import QuantEmbedding, QuantLinear


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/small/latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def weights(model: LoopLM) -> dict[str, Any]:
    """What the weights take: ``bytes`` (float parameters, each tied tensor once, plus every
    quantised matrix's codes and scales), ``quantised`` (weights held in a quantised format) and
    ``formats``: per format (``int8 g32``, ``int4 g64``, ``int8 per row``) its weights and bits per
    weight, scales included (docs/mechanisms.md §4.1)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    formats: dict[str, dict[str, Any]] = {}
    quantised = 0
    for m in model.modules():
        if isinstance(m, QuantLinear | QuantEmbedding):
            seen.update({t.data_ptr(): t.numel() * t.element_size() for t in m.parts().values()})
            g = m.fmt.group_size
            name = f"{m.fmt.name} {f'g{g}' if g else 'per row'}"
            entry = formats.setdefault(name, {"weights": 0, "bits": m.fmt.bits})
            entry["weights"] += m.rows * m.cols
            quantised += m.rows * m.cols
    return {"bytes": sum(seen.values()), "quantised": quantised, "formats": formats}


def run(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    model = load_model(ckpt).eval()
    layers = [(f"{part} {i}", layer) for part in ("prelude", "core", "coda")
              for i, layer in enumerate(getattr(model, part))]
    info: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "params_unique": model.num_params(unique=True),
        "params_total": model.num_params(unique=False),
        "flops_per_token": model.flops_per_token(),
        "weights": weights(model),
        "config": model.config.to_dict(),
        "kernels": {name: f"{layer.mixer_name}: {describe(layer)}" for name, layer in layers},
    }
    stack = model.stack_layers()
    if stack is not None and stack_plan(stack[1]) is not None:
        info["decoding_step"] = "C++ whole-stack step: attn_stack_step (every layer in one call per token)"
    state_file = ckpt / "train_state" / "state.json"
    if state_file.is_file():
        try:
            info["step"] = json.loads(state_file.read_text()).get("step")
        except (UnicodeDecodeError, ValueError, AttributeError):
            raise CheckpointError(f"{str(state_file)!r} is corrupted (not a JSON object)") from None
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"checkpoint       {ckpt}")
    floats = " (float; the quantised ones are under weights)" if info["weights"]["quantised"] else ""
    print(f"parameters       {info['params_unique']:,} unique, {info['params_total']:,} with reuse{floats}")
    w = info["weights"]
    kinds = "".join(f"; {n:,} in {name} ({v['bits']:g} bits each)" for name, v in w["formats"].items()
                    for n in [v["weights"]])
    print(f"weights          {w['bytes'] / 1e6:,.2f} MB{kinds}")
    print(f"FLOPs per token  {info['flops_per_token']:,.0f} (forward + backward)")
    if info.get("step") is not None:
        print(f"trained steps    {info['step']}")
    print("decoding kernels")
    if "decoding_step" in info:  # one token per row on unmasked caches; the layers' own steps otherwise
        print(f"  {'whole step':<20} {info['decoding_step']}")
    for name, text in info["kernels"].items():
        print(f"  {name:<20} {text}")
    print("config")
    for key, value in info["config"].items():
        print(f"  {key:<20} {value}")
    return 0
