"""``looplm info CHECKPOINT``: parameters (unique and with reuse), FLOPs per token, config, and the
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/small/latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


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
    print(f"parameters       {info['params_unique']:,} unique, {info['params_total']:,} with reuse")
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
