"""FSDP2 for ``looplm train`` under torchrun (``--set fsdp=true``): parameters, gradients and
optimizer state sharded over the processes (PyTorch's ``fully_shard``; Zhao et al. 2023,
"PyTorch FSDP"), for a model whose training state does not fit one process.

Each unique layer (prelude, core, coda) is one FSDP unit, the embedding, final norm and head the
root's: a layer's weights are gathered just before it runs (for each recursion of a core layer)
and freed after, its gradients reduce-scattered in the backward. Frozen weights (a LoRA
fine-tune's) are sharded too and take no gradient. Checkpoints stay whole: ``full_state`` gathers
the weights and the optimizer state onto a plain model and optimizer on rank 0, which
``save_checkpoint`` writes as for one process; ``load_full`` shards such a checkpoint back, so a
run resumes under FSDP, DDP or one process alike. Gloo (CPU) and NCCL both run it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from looplm.errors import ConfigError
from looplm.layers.init import skip_random_init
from looplm.model import LoopLM
from looplm.train.config import TrainConfig
from looplm.train.optim import build_optimizer
from looplm.train.run_checkpoint import load_checkpoint

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL_IN = StateDictOptions(full_state_dict=True)


def shard(model: nn.Module) -> nn.Module:
    """``model`` (a LoopLM) with every layer and then the whole sharded in place (FSDP2 units)."""
    if not isinstance(model, LoopLM):
        raise ConfigError("train.fsdp shards a LoopLM; this model is not one")
    for layer in (*model.prelude, *model.core, *model.coda):
        fully_shard(layer)
    fully_shard(model)
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Gradients accumulate locally (no reduce-scatter) inside: micro-batches before the last."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(value: torch.Tensor) -> torch.Tensor:
    """A sharded result (``clip_grad_norm_``'s total norm) as a plain tensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _plain(model: LoopLM, cfg: TrainConfig) -> tuple[LoopLM, torch.optim.Optimizer]:
    """An unsharded copy of ``model``'s structure (weights not copied, nor randomly initialised:
    the callers load every one; the same trainable parameters) and its optimizer, built as the run's."""
    with skip_random_init():
        plain = LoopLM(model.config)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in plain.named_parameters():
        p.requires_grad_(trainable[name])
    return plain, build_optimizer(plain, cfg)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig) -> tuple[LoopLM, torch.optim.Optimizer] | None:
    """Gather the sharded weights and optimizer state (every rank must call): on rank 0 a plain
    model and optimizer holding them, for ``save_checkpoint``; None on the others."""
    assert isinstance(model, LoopLM)
    weights = get_model_state_dict(model, options=_FULL)
    state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not weights:  # not rank 0 (cpu_offload gathers onto rank 0 only)
        return None
    plain, opt = _plain(model, cfg)
    plain.load_state_dict(weights)
    set_optimizer_state_dict(plain, opt, state, options=_FULL_IN)
    return plain, opt


def load_full(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
              cfg: TrainConfig) -> dict[str, Any]:
    """``load_checkpoint`` of a whole checkpoint into the sharded ``model`` and ``optimizer``
    (every rank reads it, then keeps its shards); returns the run state."""
    assert isinstance(model, LoopLM)
    plain, opt = _plain(model, cfg)
    run = load_checkpoint(ckpt, plain, opt)
    set_model_state_dict(model, plain.state_dict(), options=_FULL_IN)
    set_optimizer_state_dict(model, optimizer, get_optimizer_state_dict(plain, opt, options=_FULL_IN),
                             options=_FULL_IN)
    return run
