"""Fine-tuning from a checkpoint (``looplm train --init DIR``): LoRA adapters with everything else
frozen, new modules (a MoR router) added to a converted model, and knowledge distillation.

``init_model``: the checkpoint's model, with model fields overridden (``--set router=...``: a
field that adds parameters, such as a router, starts them fresh; one that changes the shape of a
stored weight is an error), and with ``lora_rank`` LoRA adapters on every layer's projections
(layers/lora.py), which are then the only trainable parameters (Hu et al. 2021).

``merge_adapters``: a fine-tuned model without adapters, ``W + B A`` folded into each weight
(possible when every layer has one adapter, i.e. no recursion), so it decodes at the plain
model's speed.

``distillation``: the KL divergence from a teacher's next-token distribution to the student's,
``T^2 · KL(softmax(z_t / T) || softmax(z_s / T))`` per token (Hinton et al. 2015), added to the
LM loss with a weight; the teacher runs under ``no_grad`` in eval mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from looplm.checkpoint import load_model
from looplm.errors import ConfigError
from looplm.layers.lora import LoRALinear, lora_parameters
from looplm.model import LoopConfig, LoopLM

__all__ = ["distillation", "init_model", "merge_adapters"]

NEW_PARAMETERS = ("router.", "lora_")  # parameters an override may add to a loaded model


def init_model(directory: str, overrides: dict[str, Any], lora_rank: int = 0) -> LoopLM:
    """The model of checkpoint ``directory`` with ``overrides`` and ``lora_rank`` adapters (the only
    trainable parameters when ``lora_rank > 0``)."""
    base = load_model(directory)
    fields = {**overrides, **({"lora_rank": lora_rank} if lora_rank else {})}
    if not fields:
        return base
    try:
        config = dataclasses.replace(base.config, **fields)
    except TypeError as err:
        raise ConfigError(f"--init {directory!r}: {err}") from None
    config = LoopConfig.from_dict(config.to_dict())  # validated
    model = LoopLM(config)
    target = model.state_dict()
    shapes = [k for k, v in base.state_dict().items() if k in target and target[k].shape != v.shape]
    if shapes:
        raise ConfigError(f"--set changes the shape of {shapes[0]} of {directory!r}; only fields that add "
                          "parameters (router, lora_rank) or none (capacity, threshold...) can change")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    absent = [k for k in missing if not k.startswith(NEW_PARAMETERS) and ".lora_" not in k]
    if unexpected or absent:
        raise ConfigError(f"--set does not fit the weights of {directory!r}: {(unexpected + absent)[:3]}")
    if lora_rank:
        adapters = {id(p) for p in lora_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in adapters)
    return model


def distillation(teacher: torch.nn.Module, weight: float = 1.0,
                 temperature: float = 1.0) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``extra(x [B,T], out) -> weight · T^2 · KL(teacher || student)`` averaged over the tokens."""
    if weight <= 0 or temperature <= 0:
        raise ConfigError("--distill-weight and the temperature must be positive")
    teacher.eval().requires_grad_(False)

    def extra(x: torch.Tensor, out: Any) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(x).logits.float() / temperature, -1)
        student = F.log_softmax(out.logits.float() / temperature, -1)
        kl = F.kl_div(student.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")
        return weight * temperature ** 2 * kl

    return extra


@torch.no_grad()
def merge_adapters(model: LoopLM) -> LoopLM:
    """``model`` with its LoRA adapters folded into the weights (``lora_rank = 0``); a model with
    per-recursion adapters cannot be merged (ConfigError)."""
    c = model.config
    if not c.lora_rank:
        return model
    if c.n_recursions > 1:
        raise ConfigError("per-recursion adapters of a recursive model cannot be merged into shared weights")
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.weight"] = m.weight + m.delta(0)
    weight = model.embed.weight
    merged = LoopLM(dataclasses.replace(c, lora_rank=0)).to(weight.device, weight.dtype)
    merged.load_state_dict(state, strict=True)
    return merged

