"""Trained draft heads for self-speculative decoding, and their distillation.

- ``ExitHead`` (early exit, as in LayerSkip, Elhoushi et al. 2024, and Draft & Verify, Zhang et
  al. 2023): the hidden state after the first K layers ``h [.., d]`` becomes
  ``RMSNorm(h + W h)`` and goes through the model's own output head. ``W [d, d]`` starts at zero
  and the norm at the final norm's weights, so an untrained exit head is the plain truncation.
- ``MedusaHeads`` (Cai et al. 2024): H residual blocks ``x + SiLU(W_i x)`` on the model's final
  normed hidden state ``x`` at position t; head i (1-based) predicts token ``t + 1 + i``
  through the model's output head (the model itself predicts ``t + 1``), restricted to a
  shortlist of the corpus's most frequent tokens (``vocab [N]``, as FR-Spec, Zhao et al. 2025,
  does for its draft): the heads' logits cost N/V of the full head's, in training and drafting.
  A draft outside the shortlist is never proposed; verification by the full model keeps the
  output exact either way.

``distill_heads`` trains either from the model's own next-token distributions on a corpus
(soft cross-entropy against the frozen model's softmax), and ``save_heads`` / ``load_heads``
store them as one safetensors file whose metadata names the kind and size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from looplm.data.finetune import finetune_source
from looplm.errors import CheckpointError, ConfigError
from looplm.layers.init import skip_random_init
from looplm.layers.norms import RMSNorm
from looplm.model import LoopLM
from looplm.ops.linear import linear

HEAD_KINDS = ("exit", "medusa")


class ExitHead(nn.Module):
    """``RMSNorm(h + W h)`` for the hidden state ``h [..., d]`` after the first ``layers`` layers;
    stands in for the final norm of a truncated model (the output head stays the model's)."""

    def __init__(self, d_model: int, layers: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.layers = layers
        self.proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.norm = RMSNorm(d_model, eps=eps)

    @property
    def weight(self) -> torch.Tensor:  # LoopLM.init_state reads the device of ``norm.weight``
        return self.norm.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.proj(h))


def head_weight(model: LoopLM) -> torch.Tensor:
    """The output head's weight ``[V, d]`` in float32 (a quantised one dequantised)."""
    return (model.embed if model.head is None else model.head).weight.float()


def shortlist(tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent ids of ``tokens [N]`` (ties: the lower id), ascending ``[size]``;
    every id when ``size`` is 0 or at least ``vocab_size``."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()
    rank = counts - torch.arange(vocab_size, dtype=torch.float64) / vocab_size  # stable among ties
    return rank.topk(size).indices.sort().values


class MedusaHeads(nn.Module):
    """``H`` heads: ``forward(x [N, d]) -> [N, H, d]``, head i's input to the output head;
    ``vocab [n]`` long: the token ids the heads draft (their logits: :meth:`logits`)."""

    def __init__(self, d_model: int, heads: int, vocab: torch.Tensor) -> None:
        super().__init__()
        linears = [nn.Linear(d_model, d_model, bias=False) for _ in range(heads)]
        for lin in linears:
            nn.init.zeros_(lin.weight)
        self.blocks = nn.ModuleList(linears)  # the paper's ResBlocks; the name keys the heads file
        self.vocab: torch.Tensor
        self.register_buffer("vocab", vocab.clone().long())
        self.table: torch.Tensor | None = None  # the head's rows for vocab, [n, d] (set_table)

    def set_table(self, model: LoopLM) -> None:
        """Keep the output head's rows of the shortlist (float32, read by :meth:`logits`)."""
        self.table = head_weight(model)[self.vocab.to(model.norm.weight.device)].detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x + F.silu(lin(x)) for lin in self.blocks], dim=-2)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """Head outputs ``y [..., d]`` -> logits over the shortlist ``[..., n]``."""
        if self.table is None:
            raise RuntimeError("MedusaHeads.set_table(model) first")
        return linear(y.float(), self.table)


def new_heads(model: LoopLM, kind: str, count: int,
              vocab: torch.Tensor | None = None) -> ExitHead | MedusaHeads:
    """Fresh heads for ``model``: ``exit`` after ``count`` layers or ``medusa`` with ``count`` heads
    drafting the ids ``vocab`` (default: every id)."""
    c = model.config
    if kind == "exit":
        n_layers = c.n_prelude + c.n_core + c.n_coda
        if c.n_recursions != 1:
            raise ConfigError("an exit head needs a non-recursive model (n_recursions=1); "
                              "use --draft recursions:R for a recursive one")
        if not 1 <= count < n_layers:
            raise ConfigError(f"exit:{count}: the layer must be in 1..{n_layers - 1} "
                              f"(the model has {n_layers})")
        head = ExitHead(c.d_model, count, c.norm_eps)
        with torch.no_grad():
            head.norm.weight.copy_(model.norm.weight.float())
        return head
    if kind == "medusa":
        if count < 1:
            raise ConfigError(f"medusa:{count}: give at least one head")
        if vocab is None:
            vocab = torch.arange(c.vocab_size)
        if vocab.dim() != 1 or not len(vocab) or int(vocab.min()) < 0 or int(vocab.max()) >= c.vocab_size:
            raise ConfigError(f"a draft vocabulary must be ids in [0, {c.vocab_size}), at least one")
        heads = MedusaHeads(c.d_model, count, vocab)
        heads.set_table(model)
        return heads
    raise ConfigError(f"draft head kind {kind!r} is not one of {', '.join(HEAD_KINDS)}")


def save_heads(heads: ExitHead | MedusaHeads, path: str | Path) -> None:
    """One safetensors file; metadata ``kind``, ``count`` (exit layer or number of heads), ``d_model``."""
    kind, count = ("exit", heads.layers) if isinstance(heads, ExitHead) else ("medusa", len(heads.blocks))
    d_model = heads.norm.weight.shape[0] if isinstance(heads, ExitHead) else heads.blocks[0].in_features
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(tensors, str(path), metadata={"kind": kind, "count": str(count), "d_model": str(d_model)})


def load_heads(path: str | Path, model: LoopLM) -> ExitHead | MedusaHeads:
    """Heads written by :func:`save_heads` for ``model`` (CheckpointError naming the file when it
    is missing, not a heads file, or made for another width)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"draft heads file {str(path)!r} does not exist "
                              "(write one with looplm train-draft)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        kind, count, d_model = meta["kind"], int(meta["count"]), int(meta["d_model"])
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"{str(path)!r} is not a draft heads file: {err}") from None
    if d_model != model.config.d_model:
        raise CheckpointError(f"{str(path)!r} holds heads for d_model={d_model}, the model has "
                              f"{model.config.d_model}")
    vocab = tensors.get("vocab") if kind == "medusa" else None
    heads = new_heads(model, kind, count, vocab)
    try:
        heads.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not match {kind} heads: {err}") from None
    heads = heads.to(model.norm.weight.device).eval()
    if isinstance(heads, MedusaHeads):
        heads.set_table(model)
    return heads


def truncated_model(model: LoopLM, layers: int, final: nn.Module | None = None) -> LoopLM:
    """A LoopLM running the first ``layers`` unique layers of a non-recursive ``model`` (prelude,
    core, coda in order), sharing its modules (no copy), then ``final`` (default: the model's
    final norm) and the model's output head."""
    c = model.config
    unique = [*model.prelude, *model.core, *model.coda]
    config = dataclasses.replace(c, n_prelude=0, n_core=layers, n_coda=0)
    with torch.device("meta"), skip_random_init():  # its modules are replaced by the model's
        draft = LoopLM(config)
    draft.embed, draft.head = model.embed, model.head
    # an exit head stands in for the final norm (with the ``weight`` whose device LoopLM reads)
    draft.norm = model.norm if final is None else final  # type: ignore[assignment]
    draft.core = nn.ModuleList(unique[:layers])
    return draft.eval()


def fewer_recursions(model: LoopLM, recursions: int) -> LoopLM:
    """A LoopLM sharing ``model``'s modules that runs every token through ``recursions`` passes of
    the core (no router)."""
    config = dataclasses.replace(model.config, n_recursions=recursions, router="none", capacity=None)
    with torch.device("meta"), skip_random_init():  # its modules are replaced by the model's
        draft = LoopLM(config)
    draft.embed, draft.head, draft.norm = model.embed, model.head, model.norm
    draft.prelude, draft.core, draft.coda = model.prelude, model.core, model.coda
    return draft.eval()


# ---------------------------------------------------------------- distillation


def corpus_texts(source: str = "finetune") -> list[str]:
    """Training text for draft heads: ``finetune`` is the fine-tuning corpus of
    :mod:`looplm.data.finetune` (the stdlib's Python and the English text beside it, without the
    held-out texts ``bench speculative`` and ``bench pretrained`` evaluate on); otherwise
    ``source`` is a text file."""
    if source != "finetune":
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--data {source!r} is not a file (give a text file or 'finetune')")
        return [path.read_text(encoding="utf-8", errors="replace")]
    texts: list[str] = []
    whole = True  # whether the previous document ended its file (a large file comes in pieces)
    for doc in finetune_source().documents():
        piece = doc.data.decode("utf-8", errors="replace")
        if whole:
            texts.append(piece)
        else:
            texts[-1] += piece
        whole = doc.last
    return texts


def _soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``student`` logits against ``softmax(teacher)``, mean over rows."""
    return -(teacher.float().softmax(-1) * student.float().log_softmax(-1)).sum(-1).mean()


def distill_heads(model: LoopLM, heads: ExitHead | MedusaHeads, tokens: torch.Tensor, *, seq_len: int = 128,
                  batch_size: int = 2, steps: int | None = None, max_minutes: float | None = None,
                  lr: float = 1e-3, seed: int = 0,
                  log: Callable[[int, float], Any] | None = None) -> list[float]:
    """Train ``heads`` on windows of ``tokens [N]`` against the frozen ``model``'s own output
    distributions; stops after ``steps`` or ``max_minutes`` (at least one). Returns the losses."""
    if steps is None and max_minutes is None:
        raise ValueError("give steps or max_minutes")
    if tokens.numel() < seq_len + 1:
        raise ConfigError(f"the corpus has {tokens.numel()} tokens, fewer than one window of {seq_len + 1}")
    device = model.norm.weight.device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    flags = [p.requires_grad for p in model.parameters()]
    hidden: dict[str, torch.Tensor] = {}
    hook = model.norm.register_forward_hook(lambda mod, args, out: hidden.__setitem__("h", out))
    student = truncated_model(model, heads.layers, heads) if isinstance(heads, ExitHead) else None
    no_logits = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
    losses: list[float] = []
    start = time.monotonic()
    model.eval()
    heads.train()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        while True:
            at = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=gen)
            ids = torch.stack([tokens[i:i + seq_len] for i in at.tolist()]).to(device)
            if isinstance(heads, MedusaHeads):  # teacher and heads over the heads' shortlist only
                with torch.no_grad():
                    model(ids, logits_at=no_logits)
                    h = hidden["h"]
                    teacher = heads.logits(h)
                x = heads(h)  # [B, T, H, d]
                parts = [_soft_ce(heads.logits(x[:, : seq_len - i, i - 1]), teacher[:, i:])
                         for i in range(1, x.shape[2] + 1) if seq_len > i]
                loss = torch.stack(parts).mean()
            elif student is not None:
                with torch.no_grad():
                    teacher = model(ids).logits
                loss = _soft_ce(student(ids).logits, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if log is not None:
                log(len(losses), losses[-1])
            if steps is not None and len(losses) >= steps:
                break
            if max_minutes is not None and time.monotonic() - start >= 60 * max_minutes:
                break
    finally:
        hook.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        heads.eval()
    return losses

