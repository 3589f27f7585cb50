"""Quantised checkpoints: the float layout (checkpoint.py) plus a ``quantization`` block in
config.json (format, group_size, zero_point, modules); model.safetensors holds each quantised
module's packed parts and scales (``<module>.q``, ``.scale``, ``.packed``, ``.offset``,
``.exponent``) and every other tensor as in a float checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from looplm.checkpoint import CONFIG_FILE, MODEL_TYPE, WEIGHTS_FILE, load_config
from looplm.errors import CheckpointError
from looplm.model import LoopLM
from looplm.quant.ptq import apply_structure

BLOCK = "quantization"


def read_block(directory: str | Path) -> dict[str, Any] | None:
    """The ``quantization`` block of ``directory/config.json``, or None for a float checkpoint."""
    file = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # load_config reports these
    block = data.get(BLOCK) if isinstance(data, dict) else None
    if block is not None and not isinstance(block, dict):
        raise CheckpointError(f"{str(file)!r}: '{BLOCK}' must be an object with format, group_size, modules")
    return block


def save_quantized(model: LoopLM, directory: str | Path) -> Path:
    """Write a model quantised by ``quantize_model`` as config.json + model.safetensors."""
    block = getattr(model, BLOCK, None)
    if not isinstance(model, LoopLM) or block is None:
        raise TypeError("save_quantized needs a LoopLM passed through quantize_model")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, **model.config.to_dict(), BLOCK: block}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt", BLOCK: block["format"]})
    return path


def load_quantized(directory: str | Path, map_location: str | torch.device = "cpu",
                   kernel: str = "auto") -> LoopLM:
    """Rebuild a quantised LoopLM; CheckpointError when the block or the tensors do not fit."""
    config = load_config(directory)
    block = read_block(directory)
    if block is None:
        raise CheckpointError(f"{str(directory)!r} has no '{BLOCK}' block: it is a float checkpoint; "
                              "load it with load_model")
    model = LoopLM(config)
    try:
        apply_structure(model, block, kernel)
    except (KeyError, ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(f"bad '{BLOCK}' block in {str(Path(directory) / CONFIG_FILE)!r} ({err}); "
                              "re-run looplm quantize on the float checkpoint") from None
    file = Path(directory) / WEIGHTS_FILE
    try:
        stored = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {str(file)!r}: {err}") from None
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [f"{k} is {tuple(s.shape)} {s.dtype}, the block wants {tuple(v.shape)} {v.dtype}"
                 for k, v in expected.items() if (s := stored.get(k)) is not None
                 and (s.shape != v.shape or s.dtype != v.dtype)]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"weights in {str(file)!r} do not match the '{BLOCK}' block of config.json "
                              f"({block.get('format')}): {'; '.join(problems[:3])}{more}")
    model.load_state_dict(stored, strict=True)
    return model.to(map_location)
