"""Read a Hugging Face model directory (``config.json``, ``*.safetensors`` with or without
``model.safetensors.index.json``, ``tokenizer.json`` [+ ``tokenizer_config.json``]) into a
:class:`Source`. Only safetensors are read: nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from looplm.errors import ConversionError
from looplm.pretrained.source import Source

TOKENIZER_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "chat_template")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{str(path)!r} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{str(path)!r} must hold a JSON object")
    return data


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_json(index).get("weight_map", {}).values()))
        files = [directory / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConversionError(
                f"{str(index)!r} names weight files that are missing: {', '.join(missing[:3])}"
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = list(directory.glob("*.bin")) + list(directory.glob("*.pt"))
        hint = " (only pickled .bin/.pt weights, which looplm does not unpickle)" if bins else ""
        raise ConversionError(f"{str(directory)!r} has no *.safetensors weights{hint}")
    return files


def _tokenizer(directory: Path) -> tuple[str, dict[str, Any]]:
    path = directory / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConversionError(
            f"{str(path)!r} is missing: the model's tokenizer is needed (a fast tokenizer's tokenizer.json)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConversionError(f"cannot read {str(path)!r}: {err}") from None
    cfg_path = directory / "tokenizer_config.json"
    raw = _json(cfg_path) if cfg_path.is_file() else {}
    config = {k: raw[k] for k in TOKENIZER_KEYS if k in raw}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if isinstance(config.get(k), dict):  # {"content": "<s>", ...}
            config[k] = config[k].get("content")
    template = directory / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
    if isinstance(config.get("chat_template"), list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
        config["chat_template"] = named.get("default")
    return text, config


def read_hf_dir(directory: str | Path) -> Source:
    """The model in the Hugging Face directory ``directory`` (float32 tensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{str(directory)!r} is not a directory")
    config = _json(directory / "config.json")
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key).float()
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"cannot read {str(file)!r} ({err}); is it truncated?") from None
    tokenizer_json, tokenizer_config = _tokenizer(directory)
    return Source(config, tensors, tokenizer_json, tokenizer_config, str(directory))
