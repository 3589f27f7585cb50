"""Quantisation-aware training: fake-quantised weights with a straight-through gradient.

The forward uses ``Ŵ = dequantize(quantize(W))`` in the chosen format; the backward treats the
rounding as the identity (straight-through estimator, Bengio et al. 2013; as in QAT for LLMs,
LLM-QAT, Liu et al. 2023): ``∂L/∂W = ∂L/∂Ŵ``. Modules keep their class's parameters and
state-dict keys, so a QAT run saves an ordinary float checkpoint that ``looplm quantize``
then turns into the real format with less loss than post-training quantisation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from looplm.layers.moe import MoE
from looplm.quant.formats import Format, fake_quantize, make_format
from looplm.quant.ptq import M, expert_weights, select_modules


def ste(w: Tensor, fmt: Format) -> Tensor:
    """``w`` fake-quantised in ``fmt`` in the forward, identity in the backward."""
    return w + (fake_quantize(w, fmt) - w).detach()


class ExpertSTE:
    """An MoE's ``expert_weight_fn``: its stacked matrices ``W [E, in, out]`` named in ``leaves``
    fake-quantised in ``fmt`` as ``QuantExperts`` stores them (each expert's ``W_eᵀ [out, in]``,
    groups along ``in``), straight-through."""

    def __init__(self, fmt: Format, leaves: set[str]) -> None:
        self.fmt, self.leaves = fmt, leaves

    def __call__(self, leaf: str, w: Tensor) -> Tensor:
        if leaf not in self.leaves:
            return w
        E, i, o = w.shape
        wt = w.transpose(1, 2).reshape(E * o, i)
        return ste(wt, self.fmt).reshape(E, o, i).transpose(1, 2)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose forward uses its weight fake-quantised in ``qat_format``."""

    qat_format: Format

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, ste(self.weight, self.qat_format), self.bias)


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` whose ``weight`` reads as its table fake-quantised in ``qat_format``, for
    the lookup and for a head tied to it (``F.linear(h, embed.weight)``), as after
    ``quantize_model``. ``parameters()`` / ``state_dict()`` still hold the float table."""

    qat_format: Format

    def __getattr__(self, name: str) -> Tensor | nn.Module:
        value = super().__getattr__(name)
        return ste(value, self.qat_format) if name == "weight" and isinstance(value, Tensor) else value

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)


def apply_qat(model: M, format: str, *, group_size: int | None = None, zero_point: bool = True,
              keep_embeddings: bool = True, keep_head: bool = True) -> M:
    """Make the weights ``quantize_model`` would quantise (MoE experts included, through
    ``MoE.expert_weight_fn``) fake-quantise in ``format``, in place
    (the same parameter objects: call before or after building the optimizer). Returns
    ``model``; ``model.qat_format`` records the format. A head tied to a fake-quantised
    embedding reads the fake-quantised table too (it is quantised with it)."""
    fmt = make_format(format, group_size, zero_point)
    experts = expert_weights(model)
    for name in select_modules(model, fmt, keep_embeddings=keep_embeddings, keep_head=keep_head):
        if name in experts:
            moe_name, _, leaf = name.rpartition(".")
            moe = model.get_submodule(moe_name)
            if not isinstance(moe, MoE):
                raise TypeError(f"{moe_name!r} holds stacked expert weights but is a {type(moe).__name__}")
            if not isinstance(moe.expert_weight_fn, ExpertSTE):
                moe.expert_weight_fn = ExpertSTE(fmt, set())
            moe.expert_weight_fn.leaves.add(leaf)
            continue
        m = model.get_submodule(name)
        m.__class__ = QATLinear if isinstance(m, nn.Linear) else QATEmbedding
        m.qat_format = fmt  # type: ignore[assignment]  # a QAT module: qat_format is its annotated field
    # a plain attribute: torch annotates Module.__setattr__ for tensors and modules only
    model.qat_format = fmt  # type: ignore[assignment]
    return model


def remove_qat(model: M) -> M:
    """Undo ``apply_qat`` (modules back to plain ``nn.Linear`` / ``nn.Embedding``, MoE experts
    unhooked)."""
    for m in model.modules():
        if isinstance(m, MoE) and isinstance(m.expert_weight_fn, ExpertSTE):
            m.expert_weight_fn = None
        if isinstance(m, (QATLinear, QATEmbedding)):
            # back to the plain class, in place (mypy reads the narrowed class as fixed)
            m.__class__ = nn.Linear if isinstance(m, QATLinear) else nn.Embedding  # type: ignore[assignment]
            del m.qat_format
    if hasattr(model, "qat_format"):
        del model.qat_format
    return model

