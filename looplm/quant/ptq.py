"""Post-training quantisation: replace a model's ``nn.Linear`` (and optionally embedding)
weights and its MoE experts' stacked matrices by quantised modules (linear.py), and rebuild
that structure from a description."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from looplm.errors import ConfigError
from looplm.layers.moe import MoE
from looplm.quant.formats import Format, make_format
from looplm.quant.linear import QuantEmbedding, QuantExperts, QuantLinear, supports

# the embedding table and the untied head: what ``embedding_format`` applies to
END_MODULES = ("embed", "head")

# projections smaller than this (routers, per-head gates) stay in float: tiny and sensitive
MIN_FEATURES = 16


M = TypeVar("M", bound=nn.Module)  # quantised in place: the caller's module type comes back


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if leaf in owner._parameters:  # an MoE's stacked experts: a parameter becomes a module
        delattr(owner, leaf)
    setattr(owner, leaf, module)


def _tied(model: nn.Module) -> bool:
    return getattr(model, "head", "absent") is None  # LoopLM with tie_embeddings


def _big(fmt: Format, out_features: int, in_features: int) -> bool:
    return min(in_features, out_features) >= MIN_FEATURES and supports(fmt, out_features, in_features)


def expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<moe>.w_in": W [E, in, out], "<moe>.w_out": ...}``: every MoE's stacked float expert
    matrices (not yet quantised)."""
    return {f"{name}.{leaf}": w for name, m in model.named_modules() if isinstance(m, MoE)
            for leaf in ("w_in", "w_out") if isinstance(w := getattr(m, leaf), torch.Tensor)}


def select_modules(model: nn.Module, fmt: Format, *, keep_embeddings: bool = True,
                   keep_head: bool = True) -> list[str]:
    """Names of the weights ``quantize_model`` replaces: every ``nn.Linear`` and every MoE's
    stacked expert matrices (``<moe>.w_in`` / ``.w_out``) whose shape the format supports and
    whose sides are ≥ MIN_FEATURES, except ``head`` when ``keep_head``; ``nn.Embedding``s unless
    ``keep_embeddings`` (a tied embedding is the head too: it is quantised only when neither is
    kept)."""
    keep_embed = keep_embeddings or (keep_head and _tied(model))
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if _big(fmt, m.out_features, m.in_features) and not (keep_head and name == "head"):
                names.append(name)
        elif isinstance(m, nn.Embedding) and not keep_embed and supports(fmt, *m.weight.shape):
            names.append(name)
    names += [name for name, w in expert_weights(model).items() if _big(fmt, w.shape[2], w.shape[1])]
    return names


def quantize_model(model: M, format: str, *, group_size: int | None = None, zero_point: bool = True,
                   keep_embeddings: bool = True, keep_head: bool = True, kernel: str = "auto",
                   embedding_format: str | None = None, embedding_group_size: int | None = None) -> M:
    """Quantise ``model``'s weights in place (and return it) in ``format`` (formats.FORMATS).

    ``embedding_format`` (e.g. ``"int8"`` beside an int4 body, as llama.cpp's Q4 files keep a Q8_0
    tied embedding) stores the embeddings and the head in that format instead, in groups of
    ``embedding_group_size`` (None: the format's default).
    Sets ``model.quantization``: the description ``apply_structure`` needs to rebuild the
    quantised modules (format, group_size, zero_point, modules, and per-module ``overrides``);
    checkpoints store it in config.json.
    """
    if getattr(getattr(model, "config", None), "lora_rank", 0):
        raise ConfigError("the model has LoRA adapters, which quantisation would drop: merge them first "
                          "(looplm.train.finetune.merge_adapters) or quantise the model they were trained on")
    fmt = make_format(format, group_size, zero_point)
    ends = make_format(embedding_format, embedding_group_size) if embedding_format else None
    names = select_modules(model, fmt, keep_embeddings=keep_embeddings, keep_head=keep_head)
    if ends is not None:  # the ends' own format decides whether they fit
        names = [n for n in names if n not in END_MODULES]
        names += [n for n in select_modules(model, ends, keep_embeddings=keep_embeddings, keep_head=keep_head)
                  if n in END_MODULES]
    experts = expert_weights(model)
    for name in names:
        f = ends if ends is not None and name in END_MODULES else fmt
        if name in experts:
            _set(model, name, QuantExperts.from_stacked(experts[name], f, kernel))
            continue
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            _set(model, name, QuantLinear.from_linear(m, f, kernel))
        elif isinstance(m, nn.Embedding):
            _set(model, name, QuantEmbedding.from_embedding(m, f, kernel))
        else:
            raise ValueError(f"module {name!r} is a {type(m).__name__}, not a Linear or Embedding")
    overrides = {n: ends for n in names if ends is not None and n in END_MODULES}
    # a plain attribute: torch annotates Module.__setattr__ for tensors and modules only
    model.quantization = describe(fmt, names, overrides)  # type: ignore[assignment]
    return model


def _format_fields(fmt: Format) -> dict[str, Any]:
    return {"format": fmt.name, "group_size": fmt.group_size, "zero_point": fmt.zero_point}


def describe(fmt: Format, modules: list[str], overrides: dict[str, Format] | None = None) -> dict[str, Any]:
    """The ``quantization`` section of config.json; ``overrides`` (module → its own format) only
    when some module differs from ``fmt``."""
    section = {**_format_fields(fmt), "modules": list(modules)}
    if overrides:
        section["overrides"] = {n: _format_fields(f) for n, f in overrides.items()}
    return section


def _section_format(fields: dict[str, Any]) -> Format:
    return make_format(fields["format"], fields.get("group_size"), bool(fields.get("zero_point", True)))


def apply_structure(model: M, section: dict[str, Any], kernel: str = "auto") -> M:
    """Swap in empty quantised modules as described by ``section`` (config.json's ``quantization``;
    weights to be loaded next). Raises ValueError/KeyError on a section that does not fit the model."""
    fmt = _section_format(section)
    modules = section["modules"]
    if not isinstance(modules, list) or not all(isinstance(n, str) for n in modules):
        raise ValueError("'modules' must be a list of module names")
    raw = section.get("overrides") or {}
    if not isinstance(raw, dict) or not set(raw) <= set(modules):
        raise ValueError("'overrides' must map quantised module names to their formats")
    overrides = {n: _section_format(f) for n, f in raw.items()}
    experts = expert_weights(model)
    for name in modules:
        f = overrides.get(name, fmt)
        if name in experts:
            w = experts[name]
            _set(model, name, QuantExperts(w.shape[0], w.shape[1], w.shape[2], f, kernel, device=w.device))
            continue
        m = model.get_submodule(name)  # AttributeError on an unknown name
        dev = m.weight.device
        q: nn.Module
        if isinstance(m, nn.Linear):
            q = QuantLinear(m.in_features, m.out_features, f, m.bias is not None, kernel, device=dev)
        elif isinstance(m, nn.Embedding):
            q = QuantEmbedding(m.num_embeddings, m.embedding_dim, f, device=dev, kernel=kernel)
        else:
            raise ValueError(f"module {name!r} is a {type(m).__name__}, not a Linear, Embedding or "
                             "MoE expert matrix")
        _set(model, name, q)
    # a plain attribute: torch annotates Module.__setattr__ for tensors and modules only
    model.quantization = describe(fmt, modules, overrides)  # type: ignore[assignment]
    return model
