"""Model checkpoints: ``config.json`` (the LoopConfig plus ``model_type``) and ``model.safetensors``.

Nothing is unpickled. Tied weights are stored once (``safetensors.torch.save_model`` drops the
alias; the model holds no alias of its own). Any mismatch raises CheckpointError naming the fix.
Loading builds the model without initialising it (its tensors allocated, never written, so no page
of them is resident) and assigns the stored tensors to it: the weights are held once, never twice.

Quantised checkpoints (``looplm.quant.ptq.quantize_model``'s output) have the same two files plus
a ``quantization`` section in config.json (format, group_size, zero_point, modules);
model.safetensors then holds each quantised module's packed parts and scales (``<module>.q``,
``.scale``, ``.packed``, ``.offset``, ``.exponent``) and every other tensor as in a float
checkpoint. ``save_model`` / ``load_model`` handle both.

``checksums.json`` records the SHA-256 of each weight file when it is written; loading verifies
it, so flipped bytes raise CheckpointError instead of loading silently (checkpoints written before
it existed load unverified).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save_model as st_save_model

from looplm.errors import CheckpointError, ConfigError
from looplm.layers.init import skip_random_init
from looplm.memory import LOAD_BYTES_PER_PARAM, check_fits
from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import apply_structure

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"
MODEL_TYPE = "looplm"
# keys written by looplm or transformers next to the LoopConfig fields; ignored on load
METADATA_KEYS = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
                 "quantization")
SECTION = "quantization"  # config.json key of a quantised checkpoint
# LoopConfig fields stored under another name by the transformers wrapper (looplm/hf.py):
# ``top_k`` clashes with transformers' sampling parameter, ``rope_scaling`` is rewritten by it
HF_RENAMED = {"top_k": "moe_top_k", "rope_scaling": "loop_rope_scaling"}
HF_PREFIX = "model."  # the wrapper's weights are its ``model`` attribute's


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path, names: list[str]) -> None:
    """Record the SHA-256 of ``directory/name`` for each name in ``directory/checksums.json``."""
    sums = {name: sha256_file(directory / name) for name in names}
    (directory / CHECKSUMS_FILE).write_text(json.dumps({"sha256": sums}, indent=1) + "\n")


def verify_checksums(directory: Path) -> None:
    """CheckpointError naming the first file whose bytes differ from ``checksums.json`` (none: no check)."""
    record = directory / CHECKSUMS_FILE
    if not record.is_file():
        return
    try:
        sums = json.loads(record.read_text())["sha256"]
        items = [(str(name), str(digest)) for name, digest in sums.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{str(record)!r} is corrupted (not a checksum record)") from None
    for name, digest in items:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{str(file)!r} is missing; the checkpoint is incomplete")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{str(file)!r} is corrupted: its SHA-256 differs from the one recorded "
                                  "when it was written; restore it from a copy")


def save_model(model: LoopLM, directory: str | Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``checksums.json`` of ``model`` into ``directory``."""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    if getattr(model, SECTION, None) is not None:  # quantize_model's output
        path = save_quantized(model, directory)
    else:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **model.config.to_dict()}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        st_save_model(model, str(path / WEIGHTS_FILE))
    write_checksums(path, [WEIGHTS_FILE])
    return path


def load_config(directory: str | Path) -> LoopConfig:
    """The LoopConfig stored in ``directory/config.json``."""
    path = Path(directory)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist; give the directory "
                              "that save_model (or looplm train) wrote")
    if not file.is_file():
        raise CheckpointError(f"{str(file)!r} is missing: {str(path)!r} is not a looplm checkpoint")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {str(file)!r}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(file)!r} must hold a JSON object")
    if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise CheckpointError(f"{str(file)!r} is a {data['model_type']!r} model, not a looplm one")
    try:
        return LoopConfig.from_dict(_loop_fields(data))
    except ConfigError as err:
        raise CheckpointError(f"invalid config in {str(file)!r}: {err}") from None


def _loop_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The LoopConfig fields of a config.json: looplm's own (every other key an error, so typos are
    caught), or one written by transformers (``transformers_version``; its own attributes such as
    ``tie_word_embeddings`` are dropped, the renamed fields restored)."""
    if "transformers_version" not in data:
        return {k: v for k, v in data.items() if k not in METADATA_KEYS}
    names = {f.name for f in fields(LoopConfig)}
    out = {k: v for k, v in data.items() if k in names}
    out.update({field: data[key] for field, key in HF_RENAMED.items() if key in data})
    return out


def _strip_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
    """Weights saved by the transformers wrapper (every name under ``model.``) under LoopLM's names."""
    if tensors and all(k.startswith(HF_PREFIX) for k in tensors):
        return {k[len(HF_PREFIX):]: v for k, v in tensors.items()}
    return tensors


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> LoopLM:
    """Rebuild the LoopLM saved in ``directory``; CheckpointError if it is missing, corrupted or
    mismatched, ConfigError if it would not fit in memory."""
    if Path(directory).is_dir():
        verify_checksums(Path(directory))
    config = load_config(directory)
    check_fits(config, LOAD_BYTES_PER_PARAM, f"the model in {str(directory)!r}")
    if read_section(directory) is not None:
        return load_quantized(directory, map_location)
    file = Path(directory) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{str(file)!r} is missing; the checkpoint is incomplete")
    model = empty_model(config)
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = _strip_prefix({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            prefixed = next(iter(f.keys()), "") not in stored
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {str(file)!r}: {err}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [f"{k} has shape {stored[k]}, config wants {v}" for k, v in expected.items()
                 if k in stored and stored[k] != v]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"weights in {str(file)!r} do not match its config.json: {'; '.join(problems[:3])}{more}. "
            "Was config.json edited or copied from another checkpoint?"
        )
    stored = load_file(str(file), device=str(map_location))
    model.load_state_dict(_strip_prefix(stored) if prefixed else stored, strict=True, assign=True)
    return model.to(map_location)


def empty_model(config: LoopConfig) -> LoopLM:
    """``LoopLM(config)`` to be loaded with ``load_state_dict(..., assign=True)``: its weights are
    uninitialised memory that nothing touches before the stored tensors replace them."""
    with skip_random_init():
        return LoopLM(config)


def read_section(directory: str | Path) -> dict[str, Any] | None:
    """The ``quantization`` section of ``directory/config.json``, or None for a float checkpoint."""
    file = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # load_config reports these
    section = data.get(SECTION) if isinstance(data, dict) else None
    if section is not None and not isinstance(section, dict):
        raise CheckpointError(f"{str(file)!r}: '{SECTION}' must be an object with format, group_size, "
                              "modules")
    return section


def save_quantized(model: LoopLM, directory: str | Path) -> Path:
    """Write a model quantised by ``quantize_model`` as config.json + model.safetensors."""
    section = getattr(model, SECTION, None)
    if not isinstance(model, LoopLM) or section is None:
        raise TypeError("save_quantized needs a LoopLM passed through quantize_model")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, **model.config.to_dict(), SECTION: section}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt", SECTION: section["format"]})
    return path


def load_quantized(directory: str | Path, map_location: str | torch.device = "cpu",
                   kernel: str = "auto") -> LoopLM:
    """Rebuild a quantised LoopLM; CheckpointError when the section or the tensors do not fit."""
    config = load_config(directory)
    section = read_section(directory)
    if section is None:
        raise CheckpointError(f"{str(directory)!r} has no '{SECTION}' section: it is a float checkpoint; "
                              "load it with load_model")
    model = empty_model(config)
    try:
        apply_structure(model, section, kernel)
    except (KeyError, ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(f"bad '{SECTION}' section in {str(Path(directory) / CONFIG_FILE)!r} ({err}); "
                              "re-run looplm quantize on the float checkpoint") from None
    file = Path(directory) / WEIGHTS_FILE
    try:
        stored = _strip_prefix(load_file(str(file)))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {str(file)!r}: {err}") from None
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [f"{k} is {tuple(s.shape)} {s.dtype}, the quantised layout wants {tuple(v.shape)} {v.dtype}"
                 for k, v in expected.items() if (s := stored.get(k)) is not None
                 and (s.shape != v.shape or s.dtype != v.dtype)]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"weights in {str(file)!r} do not match the '{SECTION}' section of config.json "
                              f"({section.get('format')}): {'; '.join(problems[:3])}{more}")
    model.load_state_dict(stored, strict=True, assign=True)
    return model.to(map_location)
