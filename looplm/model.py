"""LoopConfig and LoopLM: the whole architecture in one file.

A token's path: ``embed → prelude (unique layers) → recursive core (a shared stack applied up to
n_recursions times, a router choosing the tokens that continue) → coda (unique layers) → RMSNorm
→ head``. A vanilla Transformer is ``n_recursions=1, router="none", mixer="attention",
ffn="dense"``. Mixture-of-Recursions: Bae et al. 2025; see docs/architecture.md ("Model").
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from looplm.errors import ConfigError
from looplm.flops import Tally, flops_per_token
from looplm.layers.ffns import FFNS
from looplm.layers.layer import Layer, as_layers
from looplm.layers.layer_step import stack_step
from looplm.layers.linear import Linear
from looplm.layers.lora import LoRALinear, add_lora
from looplm.layers.mixer_states import KVState
from looplm.layers.mixers import MEMORY_MIXERS
from looplm.layers.mixers import MIXERS as MIXER_REGISTRY
from looplm.layers.norms import RMSNorm
from looplm.ops.attention import check_rope_scaling
from looplm.ops.linear import linear
from looplm.routers import (
    LAYER_ROUTERS,
    ROUTERS,
    ExpertChoiceRouter,
    HaltingRouter,
    TokenChoiceRouter,
    gather_index,
    router_spec,
)
from looplm.state import ModelState

MIXERS = tuple(MIXER_REGISTRY)  # layers/mixers.py registers them
# one row's forward of at most this many tokens over a state (speculative decoding's verification)
# runs the whole stack in one C++ call, as a decoding step does
VERIFY_TOKENS = 16
CHOICES = {
    "mixer": MIXERS,
    "sharing": ("cycle", "middle_cycle"),
    "router": tuple(ROUTERS),
    "selection": ("topk", "threshold"),
    "ffn": tuple(FFNS),
    "layer_router": tuple(LAYER_ROUTERS),
    "halting_loss": ("kl", "act"),
    "moe_router": ("linear", "recurrent"),
}


def _has_type(value: Any, kind: str) -> bool:
    """Whether a config value matches one alternative of a field's annotation (``int``, ``list[float]``)."""
    if kind == "None":
        return value is None
    if kind == "list[float]":
        return isinstance(value, list) and all(_has_type(v, "float") for v in value)
    if isinstance(value, bool):
        return kind == "bool"
    types: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}
    base = types.get(kind.partition("[")[0])
    return isinstance(value, dict) if kind.startswith("dict") else base is None or isinstance(value, base)


@dataclass
class LoopConfig:
    """Every knob of LoopLM; validated at construction (one ConfigError naming the field).

    ``capacity``: expert_choice keep fraction of the sequence per recursion (non-increasing, in
    (0, 1]); ``None`` is MoR's hierarchical rule ``β_r = (N_r − r + 1) / N_r``. ``selection``:
    the expert_choice rule of ``forward`` — ``topk`` over the sequence (training) or
    ``threshold`` on σ(score) (causal; what decoding must use unless the routing is replayed).
    ``attn_every = k > 0`` makes every k-th layer (global index over the unique layers)
    attention, the others ``mixer``. ``sharing="middle_cycle"`` (MoR) needs at least one unique
    layer before and after the cycled core. ``d_ffn=None`` is ``8/3·d_model`` rounded up to 32.
    ``zero_experts = n`` adds n MoE++ zero-computation experts, kinds in turn zero, copy, constant;
    ``shared_expert`` adds a SwiGLU of width ``d_ffn`` that every token runs. ``ffn="none"``: layers
    have no FFN at all (mixer-only models, as Zoology's MQAR models). ``lora_rank = r > 0`` wraps
    every layer's linear layers in LoRA adapters (layers/lora.py); the core's layers get one
    adapter per recursion (Relaxed Recursive Transformers). ``window``: the sliding window of
    the linearised ``liger_*`` mixers (0: none); ``liger_norm``: ``liger_gla`` reads its state
    normalised (layers/liger.py). ``grad_checkpoint``: in training, each layer
    application (every layer at every recursion) keeps only its input and recomputes its
    activations in the backward (Chen et al. 2016), trading one more forward for memory; results
    and gradients are unchanged.
    ``layer_router="mod"``: Mixture-of-Depths on every other unique layer (odd global index), each
    running on the top ``mod_capacity`` fraction of the sequence (``selection`` as above; at
    capacity 1 no router is built: the plain model). ``router="halting"``: PonderNet halting over
    the recursions; a token stops once its unhalted probability is ``<= halting_threshold``
    (0: every recursion), ``halting_prior`` is the geometric prior's λ_p, ``halting_loss="act"``
    swaps the KL for ACT's ponder cost. ``moe_router="recurrent"``: RMoE's GRU (hidden
    ``moe_router_dim``) carries routing state from MoE layer to layer and recursion to recursion.
    ``mixer="mom"``: mixture of memories, each token routed to ``memory_top_k`` of ``memories``
    ``memory_mixer`` states (plus a shared one with ``memory_shared``).
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_prelude: int = 0
    n_core: int = 4
    n_coda: int = 0
    n_recursions: int = 1
    sharing: str = "cycle"
    router: str = "none"
    capacity: list[float] | None = None
    selection: str = "topk"
    threshold: float = 0.5
    kv_sharing: bool = False
    mixer: str = "attention"
    attn_every: int = 0
    ffn: str = "dense"
    d_ffn: int | None = None
    n_experts: int = 8
    top_k: int = 2
    shared_expert: bool = False
    zero_experts: int = 0
    memory_mixer: str = "gated_deltanet"
    memories: int = 4
    memory_top_k: int = 2
    memory_shared: bool = False
    moe_router: str = "linear"
    moe_router_dim: int = 32
    layer_router: str = "none"
    mod_capacity: float = 0.125
    halting_threshold: float = 0.05
    halting_prior: float = 0.5
    halting_loss: str = "kl"
    router_loss_weight: float = 0.1
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    head_dim: int | None = None
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    conv_size: int = 4
    window: int = 0  # linearised mixers (liger_*): sliding-window softmax attention inside the layer
    liger_norm: bool = False  # liger_gla: normalised read-out q S / q z (not in Liger; layers/liger.py)
    chunk_size: int | None = None  # None: each op's fastest (64 decay family, 32 delta rule)
    dropout: float = 0.0
    init_std: float = 0.02
    lora_rank: int = 0  # LoRA adapters on every layer's projections; the core's one per recursion
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.capacity, (list, tuple)) and all(_has_type(c, "float") for c in self.capacity):
            self.capacity = [float(c) for c in self.capacity]
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.d_ffn or 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def keep_fractions(self) -> list[float]:
        """Fraction of the sequence kept at each recursion (expert_choice)."""
        n = self.n_recursions
        return list(self.capacity) if self.capacity is not None else [(n - r) / n for r in range(n)]

    def layer_mixer(self, index: int) -> str:
        """Mixer of unique layer ``index`` (prelude, then core, then coda)."""
        if self.attn_every and (index + 1) % self.attn_every == 0:
            return "attention"
        return self.mixer

    def validate(self) -> None:
        """Raise one ConfigError naming the first invalid field and the fix."""
        for f in fields(self):
            value, kinds = getattr(self, f.name), f.type.replace(" ", "").split("|")
            if not any(_has_type(value, kind) for kind in kinds):
                raise ConfigError(f"model.{f.name} must be {f.type}, got {value!r}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        positive = ("vocab_size", "d_model", "n_heads", "n_core", "n_recursions", "max_seq_len",
                    "chunk_size", "conv_size", "n_experts", "top_k", "moe_router_dim", "memories",
                    "memory_top_k")
        for name in positive:
            value = getattr(self, name)
            if name == "chunk_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_prelude", "n_coda", "attn_every", "zero_experts", "window", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} must divide d_model={self.d_model} (or set head_dim)")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 2
                                          or self.head_dim % 2):
            raise ConfigError(f"head_dim must be an even integer >= 2 or None, got {self.head_dim!r}")
        if self.head_dim is not None and not (self.mixer.startswith("liger_") or (
                self.mixer == "attention" and not self.attn_every)):
            raise ConfigError("head_dim applies to attention-only or linearised models (mixer='attention' "
                              "with attn_every=0, or a liger_* mixer)")
        check_rope_scaling(self.rope_scaling)
        if self.liger_norm and self.mixer != "liger_gla":
            raise ConfigError(f"liger_norm applies to mixer='liger_gla', not {self.mixer!r}")
        eps = self.norm_eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.mixer == "mom" and self.memory_top_k > self.memories:
            raise ConfigError(f"memory_top_k={self.memory_top_k} exceeds memories={self.memories}")
        if self.mixer == "mom" and self.memory_mixer not in MEMORY_MIXERS:
            raise ConfigError(f"memory_mixer={self.memory_mixer!r} is not one of {', '.join(MEMORY_MIXERS)}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} must be positive and divide n_heads")
        FFNS[self.ffn].validate(self)
        if self.d_ffn is not None and self.d_ffn < 1:
            raise ConfigError(f"d_ffn must be positive or None, got {self.d_ffn}")
        if self.sharing == "middle_cycle" and (self.n_prelude < 1 or self.n_coda < 1):
            raise ConfigError("sharing='middle_cycle' needs n_prelude >= 1 and n_coda >= 1 (unique ends)")
        if self.capacity is not None:
            caps = self.capacity
            if len(caps) != self.n_recursions:
                raise ConfigError(f"capacity needs {self.n_recursions} fractions, got {caps}")
            if any(not 0 < c <= 1 for c in caps) or any(a < b for a, b in zip(caps, caps[1:])):
                raise ConfigError(f"capacity fractions must be in (0, 1] and non-increasing, got {caps}")
        for name in ("router_loss_weight", "balance_loss_weight", "z_loss_weight", "init_std", "rope_base"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("kv_sharing", "tie_embeddings", "shared_expert", "qkv_bias", "grad_checkpoint",
                     "memory_shared"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not 0 < self.mod_capacity <= 1:
            raise ConfigError(f"mod_capacity must be in (0, 1], got {self.mod_capacity}")
        if not 0 <= self.halting_threshold < 1:
            raise ConfigError(f"halting_threshold must be in [0, 1), got {self.halting_threshold}")
        if not 0 < self.halting_prior <= 1:
            raise ConfigError(f"halting_prior must be in (0, 1], got {self.halting_prior}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.layer_router == "mod" and self.kv_sharing:
            raise ConfigError("layer_router='mod' cannot be combined with kv_sharing")
        if self.router != "none" and self.n_recursions < 2:
            raise ConfigError(f"router={self.router!r} needs n_recursions >= 2 (or router='none')")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        """Build from a dict; an unknown key raises ConfigError naming it and close matches."""
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"invalid config: {err}") from None


@dataclass
class LoopOutput:
    """What ``LoopLM.forward`` returns.

    logits ``[B, T, V]``; loss: LM cross-entropy (None without targets); aux_loss: weighted
    router + MoE losses (scalar, 0 when there are none); stats: floats for logging
    (``reach`` fraction of tokens reaching each recursion, ``expert_load``, ``flops`` forward
    FLOPs spent, ``flops_per_token`` training FLOPs per valid token = 3 · forward); depth
    ``[B, T]`` recursions each token ran (pass back as ``depth=`` to replay a routing);
    state: the updated ModelState when ``use_cache`` or a state was given.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    depth: torch.Tensor | None = None
    state: ModelState | None = None


# a pytree node, so torch.export can return it (stats are empty and state None while tracing)
torch.export.register_dataclass(LoopOutput, serialized_type_name="looplm.LoopOutput")


class LoopLM(nn.Module):
    """The LoopLM language model; see the module docstring and docs/architecture.md ("Model")."""

    # set by quant.ptq.quantize_model (config.json's ``quantization`` section); a float model has
    # none: read it with ``getattr(model, "quantization", None)``
    quantization: dict[str, Any]

    def __init__(self, config: LoopConfig) -> None:
        super().__init__()
        if not isinstance(config, LoopConfig):
            raise TypeError(f"config must be a LoopConfig, got {type(config).__name__}")
        self.config = c = config
        P, C = c.n_prelude, c.n_core
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.prelude = nn.ModuleList(Layer(c, c.layer_mixer(i)) for i in range(P))
        self.core = nn.ModuleList(Layer(c, c.layer_mixer(P + i)) for i in range(C))
        self.coda = nn.ModuleList(Layer(c, c.layer_mixer(P + C + i)) for i in range(c.n_coda))
        self.router_spec = router_spec(c.router)
        self.router: nn.Module | None = self.router_spec.build(c)
        # Mixture-of-Depths: a router on every other unique layer (odd global index)
        self.layer_router_spec = LAYER_ROUTERS[c.layer_router]
        self.mod_routers = nn.ModuleDict()
        names = [f"prelude_{i}" for i in range(P)] + [f"core_{i}" for i in range(C)]
        for name in (names + [f"coda_{i}" for i in range(c.n_coda)])[1::2]:
            layer_router = self.layer_router_spec.build(c)
            if layer_router is not None:
                self.mod_routers[name] = layer_router
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.head = None if c.tie_embeddings else Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, ExpertChoiceRouter):
                nn.init.normal_(m.weight, std=c.init_std)
        self.relaxed: list[LoRALinear] = []  # the core's adapters, switched per recursion
        if c.lora_rank:
            for layer in (*self.prelude, *self.coda):
                add_lora(layer, c.lora_rank)
            self.relaxed = [m for layer in self.core for m in add_lora(layer, c.lora_rank, c.n_recursions)]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, unique: bool = True) -> int:
        """Parameters stored (``unique``) or applied when the recursion is unrolled (the core
        counted ``n_recursions`` times); tied embeddings count once."""
        total = sum(p.numel() for p in self.parameters())
        if unique:
            return total
        return total + (self.config.n_recursions - 1) * sum(p.numel() for p in self.core.parameters())

    def flops_per_token(self, seq_len: int | None = None, *, training: bool = True,
                        reach: list[float] | None = None) -> float:
        """FLOPs per token of the configured model; see :func:`looplm.flops.flops_per_token`."""
        return flops_per_token(self.config, as_layers(self.prelude), as_layers(self.core),
                               as_layers(self.coda), set(self.mod_routers), seq_len, training=training,
                               reach=reach)

    def init_state(self, batch_size: int) -> ModelState:
        """An empty decoding state with every (layer, recursion) mixer state allocated, so that a
        fixed-state model's ``nbytes()`` is the same from the first token on."""
        c = self.config
        state = ModelState.empty(batch_size, self.norm.weight.device)
        named = [(f"prelude.{i}", b) for i, b in enumerate(as_layers(self.prelude))]
        named += [(f"coda.{i}", b) for i, b in enumerate(as_layers(self.coda))]
        for r in range(c.n_recursions):
            named += [(f"core.{j}.{r}", b) for j, b in enumerate(as_layers(self.core))
                      if not (c.kv_sharing and b.is_attention and r > 0)]
        state.layers.update((key, b.init_state(batch_size)) for key, b in named)
        return state

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
        state: ModelState | None = None, mask: torch.Tensor | None = None, use_cache: bool = False,
        depth: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
    ) -> LoopOutput:
        """input_ids ``[B,T]`` long -> LoopOutput.

        targets ``[B,T]`` (−100 ignored); mask ``[B,T]`` bool (False: padding, as if absent);
        state: a ModelState from an earlier call (continue after it) — it is not modified, the
        new one is returned; ``use_cache`` starts a state when none is given; depth ``[B,T]``
        replays a routing (recursions per token, e.g. ``LoopOutput.depth`` of a full forward).
        logits_at ``[B,T]`` bool: run the output head only at these positions (e.g. where a sparse
        loss is supervised); logits are then ``[N, V]`` for its N True positions in row-major
        order (``logits[i]`` belongs to ``logits_at.nonzero()[i]``), the loss is over those
        positions only (the same value as the full loss when every supervised target is among
        them), and the head's FLOPs are counted for N positions (none selected: no head runs).
        """
        B, T = self._check(input_ids, targets, mask, depth, state)
        if logits_at is not None and (logits_at.dtype != torch.bool or tuple(logits_at.shape) != (B, T)):
            raise ValueError(f"logits_at must be a bool tensor of shape {(B, T)}")
        c = self.config
        if state is None and use_cache:
            state = self.init_state(B)
        new = None if state is None else ModelState(state.positions, dict(state.layers))
        dev = input_ids.device
        start = state.positions if state is not None else torch.zeros(B, dtype=torch.long, device=dev)
        if mask is None:  # every token valid: counts come from shapes, no device sync
            positions = start[:, None] + torch.arange(T, device=dev) if T > 1 else start[:, None]
            n_valid: int | torch.Tensor = B * T
        else:
            positions = start[:, None] + (mask.long().cumsum(1) - 1).clamp(min=0)
            n_valid = mask.sum()
        tally = Tally(c)
        h = self.embed(input_ids)
        if self.drop.p:
            h = self.drop(h)
        # the recurrent MoE router's hidden state, carried through the layers of each token
        recurrent = c.ffn == "moe" and c.moe_router == "recurrent"
        route = h.new_zeros(B, T, c.moe_router_dim) if recurrent else None
        stepping = ((T == 1 or B == 1 and T <= VERIFY_TOKENS) and mask is None and depth is None
                    and route is None and not len(self.mod_routers))
        fused = self._stack_step(h, positions, new, tally) if stepping else None
        if fused is not None:  # the whole stack's decoding step in one C++ call
            h, depth = fused
        else:
            for i, layer in enumerate(as_layers(self.prelude)):
                h, _, route = self._run(layer, f"prelude.{i}", h, new, positions, mask, tally, route=route)
            h, depth, route = self._recur(h, mask, positions, new, depth, tally, route)
            for i, layer in enumerate(as_layers(self.coda)):
                h, _, route = self._run(layer, f"coda.{i}", h, new, positions, mask, tally, route=route)
        h = self.norm(h)
        if logits_at is not None:
            h = h[logits_at]  # [N, d]
        if not h.shape[0]:  # no position selected (a prefill chunk before the last): no head
            logits = h.new_empty(0, c.vocab_size)
        elif self.head is not None:
            logits = self.head(h)
        elif (as_head := getattr(self.embed, "as_head", None)) is not None:  # a quantised tied table
            logits = as_head(h)
        else:
            logits = linear(h, self.embed.weight)
        tally.head(n_valid if logits_at is None else h.shape[0])
        loss = None
        if targets is not None:
            t = targets if mask is None else targets.masked_fill(~mask, -100)
            t = t.reshape(-1) if logits_at is None else t[logits_at]
            loss = F.cross_entropy(logits.float().reshape(t.numel(), -1), t, ignore_index=-100)
        if new is not None:
            new.positions = start + (T if mask is None else mask.sum(1))
        return LoopOutput(logits, loss, tally.aux_loss(h), tally.stats(n_valid), depth, new)

    def _check(self, input_ids, targets, mask, depth, state) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be an integer tensor [B, T]")
        B, T = input_ids.shape
        for name, t in (("targets", targets), ("mask", mask), ("depth", depth)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have the shape of input_ids {(B, T)}, got {tuple(t.shape)}")
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if state is not None and state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows but input_ids has {B}")
        return B, T

    def stack_layers(self) -> tuple[list[str], list[Layer]] | None:
        """The state keys and layers of one decoding step in order (prelude, core recursions, coda)
        when the model allows the whole-stack step (no depth router, no Mixture-of-Depths, no
        recurrent MoE router, no shared caches), else None; the layers themselves must also suit
        :func:`~looplm.layers.layer_step.stack_plan`."""
        c = self.config
        if self.router is not None or c.kv_sharing or len(self.mod_routers) or (
                c.ffn == "moe" and c.moe_router == "recurrent"):
            return None
        keys = [f"prelude.{i}" for i in range(len(self.prelude))]
        keys += [f"core.{j}.{r}" for r in range(c.n_recursions) for j in range(len(self.core))]
        keys += [f"coda.{i}" for i in range(len(self.coda))]
        prelude, core, coda = as_layers(self.prelude), as_layers(self.core), as_layers(self.coda)
        return keys, [*prelude, *(b for _ in range(c.n_recursions) for b in core), *coda]

    def _stack_step(self, h, positions, state, tally):
        """A decoding step of every layer (prelude, core recursions, coda) by
        :func:`~looplm.layers.layer_step.stack_step`, states updated in ``state``; returns (h, depth)
        or None where the layers run one by one (routing, shared caches, a layer it does not take)."""
        stack = self.stack_layers()
        if state is None or stack is None:
            return None
        keys, layers = stack
        states = [state.layers.get(key) for key in keys]
        fused = stack_step(layers, h, states, positions)
        if fused is None:
            return None
        h, states = fused
        B, T = h.shape[:2]
        state.layers.update(zip(keys, states))
        for layer, s in zip(layers, states):
            if not isinstance(s, KVState):  # a linearised layer: its window costs no pair FLOPs
                tally.decoding_step(layer, B, 0)
            elif T == 1:  # rows of different lengths (unused slots in front): each row's held keys
                layout = vars(s).get("_layout")
                padded = layout is None or layout[1] is not None
                tally.decoding_step(layer, B, s.k.shape[1] - 1, s.key_mask.sum() if padded else None)
            else:
                for t in range(T):
                    tally.decoding_step(layer, B, s.k.shape[1] - T + t)
        R = self.config.n_recursions
        tally.reach.extend(B * T for _ in range(R))
        return h, torch.full((B, T), R, dtype=torch.long, device=h.device)

    def _run(self, layer: Layer, key: str, h, state, positions, mask, tally, shared_kv=None, keep_kv=False,
             route=None):
        """Run one layer (Mixture-of-Depths: on the tokens its router keeps), reading/writing its
        state under ``key``; returns (h, mixer state, route)."""
        name = "_".join(key.split(".")[:2])  # "core.j.r" -> "core_j": one router for every recursion
        mod = self.mod_routers[name] if name in self.mod_routers else None
        if mod is None:
            return self._layer(layer, key, h, state, positions, mask, tally, shared_kv, keep_kv, route)
        valid = mask if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        keep, gate, loss = mod(0, h, valid, valid)
        tally.add_loss("mod_loss", loss, self.config.router_loss_weight)
        tally.router(self.layer_router_spec, valid.sum())
        if not bool(keep.any()):  # no token runs this layer: its state stays as it was
            s = None if state is None else state.layers.get(key)
            if state is not None and s is None:
                s = state.layers[key] = layer.init_state(h.shape[0])
            return h, s, route
        out: dict[str, Any] = {}

        def run(x, pos, m, rt):
            x, out["s"], rt = self._layer(layer, key, x, state, pos, m, tally, shared_kv, keep_kv, rt)
            return x, rt

        h, route = self._sparse(h, keep, gate, positions, route, run)
        return h, out["s"], route

    def _layer(self, layer: Layer, key: str, h, state, positions, mask, tally, shared_kv, keep_kv, route):
        s = None
        if state is not None and shared_kv is None:
            s = state.layers.get(key)
        if s is None and (keep_kv or state is not None) and shared_kv is None:
            s = layer.init_state(h.shape[0])
        tally.layer(layer, h, positions, mask, s, shared_kv)
        if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
            chosen = [lora.index for lora in self.relaxed]  # the recompute needs this recursion's adapters

            def run(h, s):
                for lora, index in zip(self.relaxed, chosen):
                    lora.index = index
                return layer(h, s, positions=positions, mask=mask, shared_kv=shared_kv, route=route)

            h, s, aux = checkpoint(run, h, s, use_reentrant=False)
        else:
            h, s, aux = layer(h, s, positions=positions, mask=mask, shared_kv=shared_kv, route=route)
        tally.ffn(layer, aux)
        if state is not None and shared_kv is None:
            state.layers[key] = s
        return h, s, aux.get("route", route)

    def _recur(self, h, mask, positions, state, depth, tally, route):
        """The recursive core; returns (h, depth ``[B,T]`` recursions each token ran, route)."""
        c = self.config
        B, T = h.shape[:2]
        if mask is None and self.router is None and depth is None:  # every token, every recursion
            kv: dict[int, Any] = {}
            for r in range(c.n_recursions):
                tally.reach.append(B * T)
                h, route = self._recursion(r, h, None, None, positions, state, kv, tally, route)
            return h, torch.full((B, T), c.n_recursions, dtype=torch.long, device=h.device), route
        valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=h.device)
        if isinstance(self.router, HaltingRouter):
            return self._halting(h, valid, positions, state, depth, tally, route)
        gate = None
        active = valid
        if isinstance(self.router, TokenChoiceRouter):
            depth, gate, loss = self.router(h, valid, depth)
            tally.add_loss("router_loss", loss, c.router_loss_weight)
            tally.router(self.router_spec, valid.sum())
        ran = torch.zeros_like(valid, dtype=torch.long)
        shared: dict[int, Any] = {}
        for r in range(c.n_recursions):
            if isinstance(self.router, ExpertChoiceRouter):
                active, gate, loss = self.router(r, h, active, valid, depth)
                tally.add_loss("router_loss", loss, c.router_loss_weight)
                tally.router(self.router_spec, valid.sum())
            elif depth is not None:
                active = active & (depth > r)
            ran = ran + active.long()
            tally.reach.append(active.sum())
            if not active.any():
                tally.reach.extend(tally.reach[-1] for _ in range(r + 1, c.n_recursions))
                break
            h, route = self._recursion(r, h, active, gate, positions, state, shared, tally, route)
        return h, ran, route

    def _halting(self, h, valid, positions, state, depth, tally, route):
        """The core under the halting router: the output is ``Σ_r q_r h_r`` (routers.HaltingRouter)."""
        c = self.config
        rem = valid.to(h.dtype)
        active, out = valid, torch.zeros_like(h)
        ran = torch.zeros_like(valid, dtype=torch.long)
        shared: dict[int, Any] = {}
        weights, reached = [], []
        for r in range(c.n_recursions):
            ran = ran + active.long()
            tally.reach.append(active.sum())
            reached.append(rem)
            h, route = self._recursion(r, h, active, None, positions, state, shared, tally, route)
            if r < c.n_recursions - 1:
                tally.router(self.router_spec, active.sum())
            weight, rem, active = self.router.step(r, h, rem, active, depth)
            weights.append(weight)
            out = out + weight[..., None] * h
            if r < c.n_recursions - 1 and not active.any():
                tally.reach.extend(0 for _ in range(r + 1, c.n_recursions))
                break
        tally.add_loss("router_loss", self.router.loss(weights, reached, valid), c.router_loss_weight)
        return torch.where(valid[..., None], out, h), ran, route

    def _recursion(self, r, h, active, gate, positions, state, shared, tally, route):
        """One pass of the core over the ``active [B,T]`` tokens (``None``: every token); returns
        (h, route)."""

        def run(x, pos, m, rt):
            for lora in self.relaxed:
                lora.index = r
            for j, layer in enumerate(self.core):
                keep_kv = self.config.kv_sharing and layer.is_attention and r == 0
                x, s, rt = self._run(layer, f"core.{j}.{r}", x, state, pos, m, tally,
                                     shared.get(j) if r else None, keep_kv, rt)
                if keep_kv:
                    shared[j] = s
            return x, rt

        return self._sparse(h, active, gate, positions, route, run)

    @staticmethod
    def _sparse(h, active, gate, positions, route, run):
        """``run(x, positions, mask, route) -> (x, route)`` on the ``active [B,T]`` tokens only,
        gathered (left-aligned, in order, true positions) into ``[B, T', d]`` so skipped tokens
        cost nothing, then scattered back; ``gate [B,T]`` scales the update (``x0 + g (x − x0)``)."""
        if active is None or bool(active.all()):
            index, kept, x0, pos, rt = None, active, h, positions, route
        else:
            index, kept = gather_index(active)
            x0 = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
            pos = positions.gather(1, index)
            rt = None if route is None else route.gather(1, index[..., None].expand(-1, -1, route.shape[-1]))
        m = None if active is None or bool(kept.all()) else kept
        x, rt = run(x0, pos, m, rt)
        if gate is not None:
            g = gate if index is None else gate.gather(1, index)
            x = x0 + g[..., None] * (x - x0)
        if index is None:
            return x, rt
        x = torch.where(kept[..., None], x, x0)
        h = h.scatter(1, index[..., None].expand_as(x), x)
        if route is not None:
            rt = torch.where(kept[..., None], rt, route.gather(1, index[..., None].expand_as(rt)))
            route = route.scatter(1, index[..., None].expand_as(rt), rt)
        return h, route
