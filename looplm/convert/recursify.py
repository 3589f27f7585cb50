"""Recursive conversion (Relaxed Recursive Transformers, Bae et al. 2024): an L-layer model becomes
one shared core of C = L / R layers applied R times (``n_recursions = R``, cycle sharing: depth
``r C + j`` runs shared layer j).

``init="select"`` (their stepwise init): shared layer j is original layer ``j R``.
``init="average"``: shared layer j is the mean of the layers it replaces, ``r C + j`` for r < R.
``lora_rank = k > 0`` adds one LoRA adapter per recursion to every linear layer of the shared
core (the relaxation), initialised as in the paper from the truncated SVD of the difference
between the layer it replaces and the shared weight: ``B A = U_k S_k V_k^T`` of
``W_{rC+j} - W_shared``, so at full rank each recursion's projections are the original ones.
Norms and other non-matrix parameters stay shared. The embedding, final norm and head are copied.
"""

from __future__ import annotations

import dataclasses

import torch

from looplm.errors import ConfigError
from looplm.layers.lora import LoRALinear
from looplm.model import LoopLM

__all__ = ["INITS", "recursify"]

INITS = ("average", "select")


def recursify(model: LoopLM, recursions: int, init: str = "average", lora_rank: int = 0) -> LoopLM:
    """A new LoopLM with ``recursions`` passes over a shared core initialised from ``model``."""
    c = model.config
    if init not in INITS:
        raise ConfigError(f"--init {init!r} is not one of {', '.join(INITS)}")
    if c.n_recursions != 1 or c.lora_rank:
        raise ConfigError("recursify needs a model without recursion or adapters "
                          "(n_recursions=1, lora_rank=0)")
    layers = [*model.prelude, *model.core, *model.coda]
    L, R = len(layers), recursions
    if R < 1 or L % R:
        divisors = [d for d in range(1, L + 1) if L % d == 0]
        raise ConfigError(f"--recursions {R} does not divide the model's {L} layers; "
                          f"choose one of {divisors}")
    C = L // R
    if c.attn_every and C % c.attn_every:
        raise ConfigError(f"the shared core of {C} layers would break the hybrid pattern "
                          f"attn_every={c.attn_every}; choose R so that it divides layers / R")
    config = dataclasses.replace(c, n_prelude=0, n_core=C, n_coda=0, n_recursions=R, sharing="cycle",
                                 router="none", capacity=None, lora_rank=lora_rank)
    new = LoopLM(config).to(model.embed.weight.device, model.embed.weight.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("prelude.", "core.", "coda."))}
    sources = [[j * R] if init == "select" else [r * C + j for r in range(R)] for j in range(C)]
    for j, src in enumerate(sources):
        for name in layers[src[0]].state_dict():
            state[f"core.{j}.{name}"] = torch.stack([layers[i].state_dict()[name] for i in src]).mean(0)
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any("lora_" not in k for k in missing):
        raise ConfigError(f"recursify: weights do not map ({(missing + unexpected)[:3]})")
    if lora_rank:
        _relax(new, layers, C, R, lora_rank)
    return new


@torch.no_grad()
def _relax(new: LoopLM, layers: list, C: int, R: int, rank: int) -> None:
    """Initialise adapter r of each shared linear layer from the SVD of (original - shared)."""
    for j, layer in enumerate(new.core):
        for name, lora in layer.named_modules():
            if not isinstance(lora, LoRALinear):
                continue
            if rank > min(lora.weight.shape):
                shape = tuple(lora.weight.shape)
                raise ConfigError(f"--lora {rank} exceeds the rank of core.{j}.{name} {shape}")
            for r in range(R):
                original = layers[r * C + j].get_submodule(name).weight
                U, S, Vh = torch.linalg.svd((original - lora.weight).double(), full_matrices=False)
                lora.lora_b[r] = (U[:, :rank] * S[:rank]).to(lora.lora_b.dtype)
                lora.lora_a[r] = Vh[:rank].to(lora.lora_a.dtype)
