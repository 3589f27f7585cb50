"""Post-training quantisation: replace a model's ``nn.Linear`` (and optionally embedding)
weights and its MoE experts' stacked matrices by quantised modules (linear.py), and rebuild
that structure from a description."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from looplm.layers.moe import MoE
from looplm.quant.formats import Format, make_format
from looplm.quant.linear import QuantEmbedding, QuantExperts, QuantLinear, supports

# projections smaller than this (routers, per-head gates) stay in float: tiny and sensitive
MIN_FEATURES = 16


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


def quantize_model(model: nn.Module, format: str, *, group_size: int | None = None, zero_point: bool = True,
                   keep_embeddings: bool = True, keep_head: bool = True, kernel: str = "auto") -> nn.Module:
    """Quantise ``model``'s weights in place (and return it) in ``format`` (formats.FORMATS).

    Sets ``model.quantization``: the description ``apply_structure`` needs to rebuild the
    quantised modules (format, group_size, zero_point, modules); checkpoints store it in
    config.json.
    """
    fmt = make_format(format, group_size, zero_point)
    names = select_modules(model, fmt, keep_embeddings=keep_embeddings, keep_head=keep_head)
    experts = expert_weights(model)
    for name in names:
        if name in experts:
            _set(model, name, QuantExperts.from_stacked(experts[name], fmt, kernel))
            continue
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            _set(model, name, QuantLinear.from_linear(m, fmt, kernel))
        else:
            _set(model, name, QuantEmbedding.from_embedding(m, fmt))
    model.quantization = describe(fmt, names)
    return model


def describe(fmt: Format, modules: list[str]) -> dict[str, Any]:
    """The ``quantization`` block of config.json."""
    return {"format": fmt.name, "group_size": fmt.group_size, "zero_point": fmt.zero_point,
            "modules": list(modules)}


def apply_structure(model: nn.Module, block: dict[str, Any], kernel: str = "auto") -> nn.Module:
    """Swap in empty quantised modules as described by ``block`` (weights to be loaded next).
    Raises ValueError/KeyError on a block that does not fit the model."""
    fmt = make_format(block["format"], block.get("group_size"), bool(block.get("zero_point", True)))
    modules = block["modules"]
    if not isinstance(modules, list) or not all(isinstance(n, str) for n in modules):
        raise ValueError("'modules' must be a list of module names")
    experts = expert_weights(model)
    for name in modules:
        if name in experts:
            w = experts[name]
            _set(model, name, QuantExperts(w.shape[0], w.shape[1], w.shape[2], fmt, kernel, device=w.device))
            continue
        m = model.get_submodule(name)  # AttributeError on an unknown name
        dev = m.weight.device
        if isinstance(m, nn.Linear):
            q = QuantLinear(m.in_features, m.out_features, fmt, m.bias is not None, kernel, device=dev)
        elif isinstance(m, nn.Embedding):
            q = QuantEmbedding(m.num_embeddings, m.embedding_dim, fmt, device=dev)
        else:
            raise ValueError(f"module {name!r} is a {type(m).__name__}, not a Linear, Embedding or "
                             "MoE expert matrix")
        _set(model, name, q)
    model.quantization = describe(fmt, modules)
    return model
