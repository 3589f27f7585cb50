"""``import_checkpoint``: a GGUF file or Hugging Face directory -> a looplm checkpoint directory.

The checkpoint is written into a temporary directory beside ``out`` and renamed at the end, so a
failure (unsupported model, truncated file, missing tensors, mismatched tokenizer) leaves
nothing at ``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from looplm.checkpoint import empty_model, save_model
from looplm.data.tokenizer import PretrainedTokenizer
from looplm.errors import ConfigError, ConversionError
from looplm.model import LoopLM
from looplm.pretrained.gguf_file import read_gguf
from looplm.pretrained.hf_dir import read_hf_dir
from looplm.pretrained.llama import loop_config, loop_state_dict, name_map
from looplm.pretrained.source import Source
from looplm.quant.linear import QuantEmbedding, QuantLinear
from looplm.quant.ptq import quantize_model

INFO_FILE = "pretrained.json"  # where the checkpoint came from


def read_source(src: str | Path, keep_codes: bool = False) -> Source:
    """A GGUF file (by its magic bytes) or a Hugging Face directory (``keep_codes``: see
    :func:`looplm.pretrained.gguf_file.read_gguf`)."""
    path = Path(src)
    if path.is_dir():
        return read_hf_dir(path)
    if not path.is_file():
        raise ConversionError(
            f"{str(path)!r} does not exist: give a .gguf file or a Hugging Face model directory"
        )
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{str(path)!r} is not a GGUF file (no GGUF magic) nor a directory")
    return read_gguf(path, keep_codes)


def build(source: Source):
    """``(LoopLM, PretrainedTokenizer)`` of ``source``; ConversionError if they do not fit."""
    config = loop_config(source.config, source.origin)
    state = loop_state_dict(config, source.tensors, source.origin)
    expected = {"embed.weight": (config.vocab_size, config.d_model)}
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ConversionError(
                f"{source.origin!r}: {name} has shape {tuple(state[name].shape)}, the config says {shape}"
            )
    try:
        tokenizer = PretrainedTokenizer.from_json(source.tokenizer_json, source.tokenizer_config)
    except ConfigError as err:
        raise ConversionError(f"{source.origin!r}: {err}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ConversionError(
            f"{source.origin!r}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"only {config.vocab_size} embeddings; they do not belong together"
        )
    model = empty_model(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shapes that do not match the config
        first = str(err).strip().splitlines()[-1].strip()
        raise ConversionError(f"{source.origin!r}: weights do not match the config: {first}") from None
    return model.eval(), tokenizer


def keep_file_codes(model: LoopLM, source: Source) -> int:
    """Give each quantised matrix of ``model`` whose every source tensor the file stores in the
    matrix's own format (``source.codes``: Q8_0 as int8 g32, Q4_1 as int4 g32) those codes,
    concatenated in the rows' order (q | k | v, gate | up) in place of its requantised parts, so
    it holds the file's weights bit for bit. Returns how many matrices."""
    kept = 0
    for name, sources in name_map(model.config).items():
        module, _, leaf = name.rpartition(".")
        m = model.get_submodule(module) if leaf == "weight" else None
        if not isinstance(m, QuantLinear | QuantEmbedding):
            continue
        codes = [source.codes.get(s) for s in sources]
        if any(c is None or c[0] != m.fmt for c in codes):
            continue
        m.set_parts({p: torch.cat([c[1][p] for c in codes if c is not None]) for p in m.fmt.parts})
        kept += 1
    return kept


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    quantize: str | None = None,
    quantize_options: dict[str, Any] | None = None,
) -> Path:
    """Write the looplm checkpoint of ``src`` to ``out`` (which must not exist or be empty);
    ``quantize``: a format of :mod:`looplm.quant.formats`, applied by ``quantize_model`` with
    ``quantize_options`` before writing; matrices whose format is the file's own (a GGUF's Q4_1 as
    int4 g32, Q8_0 as int8 g32) keep its codes (:func:`keep_file_codes`; the count is in
    ``pretrained.json``'s ``file_codes``). Returns ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{str(out)!r} already exists and is not empty; choose another --out")
    source = read_source(src, keep_codes=quantize is not None)
    model, tokenizer = build(source)
    kept = 0
    if quantize is not None:
        quantize_model(model, quantize, **(quantize_options or {}))
        kept = keep_file_codes(model, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would outlive the rename
    try:
        save_model(model, tmp)
        tokenizer.save(tmp)
        info = {
            "source": str(Path(src).resolve()),
            "architecture": (source.config.get("architectures") or [""])[0],
            "quantization": quantize,
            "file_codes": kept,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
