"""A whole layer's decoding step in C++ (one call for a fixed-state layer, two for attention), and
the decision which implementation each layer runs.

Why: a decoding step of a layer is ~35-40 small PyTorch ops (norms, projections, conv or RoPE,
gates and state update or the cache, head norm, residuals, SwiGLU) on one row; in eager mode their
dispatch overhead cost more than the arithmetic (bench model's 6-layer, width-384 gated DeltaNet
model: ~3.6 ms per token in a tight loop, of which ~1.3 ms in the projections). The kernels
compute the same :class:`looplm.layers.layer.Layer` for the B rows of one token (each weight row
read once for all rows, rows of every projection split over threads; from 4 rows on, float32
projections are BLAS matrix products, which a batch of rows needs to stay ahead of PyTorch's):

- ``csrc/layer_step.cpp``: a DeltaNet or gated DeltaNet mixer (``delta_layer_step``) or a
  linear-attention, retention, simple-GLA or GLA mixer (``decay_layer_step``);
- ``csrc/attn_step.cpp``: softmax attention with RoPE and grouped heads, around the cache append
  of :mod:`looplm.layers.kv_cache` (``attn_step_in``: norm, projections, RoPE; ``attn_step_out``:
  attention over each row's cache read front to back, output projection); only when each row's
  visible keys are one run at the end of the cache (unused slots only in front, as a batch of
  caches of different lengths has them; no later position), else the Python layer's masks run; its
  projections and dense FFN may be int8 / int4 (a quantised module's ``kernel_parts()``, multiplied
  by :mod:`looplm.ops.qlinear`'s kernel, ``csrc/qmatvec.h``), so quantised models decode in it too;
  an int8 cache (a :class:`~looplm.layers.mixer_states.QuantKVState` of int8 codes) is read as
  codes and per-row scales, dequantised a layer of rows at a time (an FP8 one runs the Python layer);
- with a dense :class:`~looplm.layers.ffn.SwiGLU` FFN or none inside those calls, or a
  :class:`~looplm.layers.moe.MoE` FFN (SwiGLU experts, optional shared expert, no
  zero-computation experts, no recurrent router) in ``csrc/moe_step.cpp``, which also returns the
  MoE's aux (load, balance and z losses) as the Python layer does.
- ``csrc/liger_step.cpp``: a linearised layer's (Liger GLA with a sliding window,
  :class:`~looplm.layers.liger.LigerGLA`) recurrence (``liger_gla_step``), its window's cache
  appended in Python, then ``attn_step_out`` (the window's attention averaged with the
  recurrence's output, output projection, FFN); the projections may be int8 / int4 as above.
- :func:`stack_step`: every layer of an attention model (dense FFN or none) in one call,
  ``attn_stack_step`` in ``csrc/attn_step.cpp``, each cache appended in place in its buffer (at 30
  layers the Python around two calls per layer cost as much as their arithmetic); float32 caches
  or int8 ones (the kernel quantises the new rows); rows of different cache lengths (unused slots
  in front, each row's first seen slot passed per layer) take it too.

The decision (:func:`decide`): whether a layer is built of the parts the kernels compute (module
types, float32 plain projections, contiguous weights) is decided once, when the layer is put in
eval or train mode or its tensors move or change dtype (``Layer.train`` / ``Layer._apply``), and
again only after a module, parameter or buffer is registered anywhere (a global registration
counter: quantisation swapping modules, a weight replaced). :func:`describe` says what was
decided (``looplm info``). Per step :func:`layer_step` checks only what a step brings: not a
decoding step (T > 1, no state, a mask, shared keys/values), autograd recording, autocast,
dropout in training, another device or dtype of the input or state, masked cache slots, and the
kernel switch (:func:`looplm.ops.cpp_ext.layer_steps`; ``cpp_ext.kernels("ops")`` turns the
layer steps off, ``cpp_ext.kernels("torch")`` every other kernel too). It returns None wherever
the Python layer must run: also MoE++ experts and biased projections (quantised ones outside an
attention layer).
Sums run in another order than PyTorch's: differences ~1e-6 relative.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from looplm.layers import kv_cache
from looplm.layers.ffn import SwiGLU
from looplm.layers.liger import LigerGLA, trim_window
from looplm.layers.linear import Linear, kernel_parts
from looplm.layers.mixer_states import KVState, LinearizedState, QuantKVState, RecurrentState
from looplm.layers.mixers import (
    GLA,
    Attention,
    DeltaNet,
    GatedDeltaNet,
    LinearAttention,
    Retention,
    SimpleGLA,
    _FixedStateMixer,
)
from looplm.layers.moe import MoE
from looplm.layers.norms import HeadRMSNorm, RMSNorm
from looplm.ops import cpp_ext
from looplm.ops.attention import rope_inv_freq
from looplm.ops.qlinear import parts_ok

_NONE3: list[None] = [None, None, None]

__all__ = ["layer_step", "decide", "describe", "stack_plan", "stack_step"]

_registrations = [0]  # modules, parameters and buffers registered in this process so far


def _registered(*_: Any) -> None:
    _registrations[0] += 1


register_module_module_registration_hook(_registered)
register_module_parameter_registration_hook(_registered)
register_module_buffer_registration_hook(_registered)


def decide(layer: Any) -> tuple[str, Any]:
    """Decide (again) which step ``layer`` (a Layer) runs: ``("attention", plan)`` (the attention
    kernels' weight arguments), ``("liger", plan)`` (a Liger GLA layer with a window: the same
    plan), ``(op, None)`` for a fixed-state kernel (``delta_layer_step`` / ``decay_layer_step``), or
    ``("python", None)``. Kept on the layer (not a submodule or buffer:
    out of ``state_dict``) with the registration count it was made at."""
    if type(layer.mixer) is Attention:
        plan = _attention_plan(layer)
        choice: tuple[str, Any] = ("python", None) if plan is None else ("attention", plan)
    elif type(layer.mixer) is LigerGLA:
        plan = _attention_plan(layer) if layer.mixer.window > 0 else None
        choice = ("python", None) if plan is None else ("liger", plan)
    else:
        args = _mixer_args(layer.mixer) if eligible(layer) else None
        choice = ("python", None) if args is None else (args[0], None)
    layer.__dict__["_layer_kernel"] = (_registrations[0], choice)
    return choice


def _decision(layer: Any) -> tuple[str, Any]:
    """The decision made for ``layer``, made again if a module, parameter or buffer was registered since."""
    cached = layer.__dict__.get("_layer_kernel")
    if cached is None or cached[0] != _registrations[0]:
        return decide(layer)
    return cached[1]


def describe(layer: Any) -> str:
    """What ``layer`` runs when decoding, in words (``looplm info``)."""
    kind, _ = _decision(layer)
    if not cpp_ext.available():
        return "PyTorch forms (C++ kernels off or not built)"
    if kind == "python" or not cpp_ext.layer_steps():
        return "Python layer (C++ ops where they apply)"
    ops = {"attention": ["attn_step_in", "attn_step_out"], "liger": ["liger_gla_step", "attn_step_out"]}.get(
        kind, [kind])
    if isinstance(layer.ffn, MoE):
        ops.append("moe_step")
    return "C++ layer step: " + " + ".join(ops)


def _plain_linear(m: Any, bias: bool) -> bool:
    """An unquantised float32 ``Linear`` with a bias exactly when ``bias``."""
    return (type(m) is Linear and m.weight.dtype == torch.float32 and (m.bias is not None) == bias
            and (not bias or m.bias.dtype == torch.float32))


def _step_weights(m: Any) -> list[torch.Tensor] | None:
    """The weight of a bias-free projection as the attention step takes it: ``[weight]`` of a plain
    float32 ``Linear``, a quantised module's ``kernel_parts()`` (int8, int4), else None."""
    if _plain_linear(m, False):
        return [m.weight]
    parts = kernel_parts(m)
    if parts is None or m.bias is not None or not parts_ok(parts, m.in_features):
        return None
    return parts if all(p.device.type == "cpu" and p.is_contiguous() for p in parts) else None



def _attention_plan(layer: Any) -> tuple[Any, ...] | None:
    """The attention kernels' weight arguments of ``layer`` (qkv parts, output parts, FFN norm and
    parts, FFN norm eps), or None where they do not apply."""
    mixer, ffn = layer.mixer, layer.ffn
    dense = type(ffn) is SwiGLU
    mods = [mixer.qkv, mixer.o_proj, *((ffn.w_in, ffn.w_out) if dense else ())]
    norms = [layer.mixer_norm.weight, *((layer.ffn_norm.weight,) if dense else ())]
    weights = [_step_weights(m) for m in mods]
    if (all(w is not None for w in weights) and type(layer.mixer_norm) is RMSNorm
            and all(n.dtype == torch.float32 and n.is_contiguous() for n in norms)
            and (ffn is None or dense or (type(layer.ffn_norm) is RMSNorm and _plain_moe(ffn)
                                          and all(p.is_contiguous() for p in ffn.parameters())))):
        ffn_args = [norms[1], weights[2], weights[3]] if dense else [None, [], []]
        return (weights[0], weights[1], ffn_args, _eps(layer.ffn_norm) if dense else 0.0)
    return None


def _mixer_args(mixer: Any) -> tuple[str, list[Any]] | None:
    """The op and the mixer-specific arguments of ``mixer``'s step, or None if the kernel does not
    compute this mixer (see ``csrc/layer_step.cpp`` for their meaning)."""
    kind = type(mixer)
    if kind in (DeltaNet, GatedDeltaNet):
        if not _plain_linear(mixer.beta_proj, True):
            return None
        gated = kind is GatedDeltaNet
        if gated and not _plain_linear(mixer.a_proj, False):
            return None
        return "delta_layer_step", [mixer.beta_proj.weight, mixer.beta_proj.bias,
                                    mixer.a_proj.weight if gated else None, mixer.A_log if gated else None,
                                    mixer.dt_bias if gated else None]
    none = [None, None, None, None, None, 1.0]  # log_gamma, gk_w, gk_b, gk2_w, gk2_b, tau
    if kind is LinearAttention:
        return "decay_layer_step", [1 if mixer.feature_map == "elu1" else 0, *none]
    if kind is Retention:
        return "decay_layer_step", [0, mixer.log_gamma.float().contiguous(), *none[1:]]
    if kind is SimpleGLA and _plain_linear(mixer.gk, True):
        gk = mixer.gk
        return "decay_layer_step", [0, None, gk.weight, gk.bias, None, None, float(mixer.gate_tau)]
    if (kind is GLA and len(mixer.gk) == 2 and _plain_linear(mixer.gk[0], False)
            and _plain_linear(mixer.gk[1], True)):
        low, full = mixer.gk
        return "decay_layer_step", [0, None, low.weight, None, full.weight, full.bias, float(mixer.gate_tau)]
    return None


def eligible(layer: Any) -> bool:
    """Whether ``layer`` (a Layer) is built of the parts the kernels compute (checked by :func:`decide`)."""
    mixer, ffn = layer.mixer, layer.ffn
    if type(mixer) is Attention:  # its FFN, dense inside attn_step_out, may be quantised too
        return _attention_plan(layer) is not None
    if not all(p.is_contiguous() for p in layer.parameters()) or type(layer.mixer_norm) is not RMSNorm:
        return False
    if not (isinstance(mixer, _FixedStateMixer)
              and all(_plain_linear(m, False) for m in (mixer.qkv, mixer.g_proj, mixer.o_proj))
              and type(mixer.norm) is HeadRMSNorm and _mixer_args(mixer) is not None):
        return False
    if ffn is not None and not (type(layer.ffn_norm) is RMSNorm and (_plain_swiglu(ffn) or _plain_moe(ffn))):
        return False
    return True


def _plain_swiglu(ffn: Any) -> bool:
    return type(ffn) is SwiGLU and _plain_linear(ffn.w_in, False) and _plain_linear(ffn.w_out, False)


def _plain_moe(ffn: Any) -> bool:
    """An MoE of float SwiGLU experts (and a plain shared expert, if any), no zero-computation
    experts, no recurrent router; quantised or fake-quantised experts run the Python layer
    (``MoE.forward``)."""
    return (type(ffn) is MoE and not any(ffn.kinds) and ffn.gru is None and _plain_linear(ffn.router, False)
            and isinstance(ffn.w_in, torch.Tensor) and isinstance(ffn.w_out, torch.Tensor)
            and ffn.expert_weight_fn is None and ffn.w_in.dtype == ffn.w_out.dtype == torch.float32
            and (ffn.shared is None or _plain_swiglu(ffn.shared)))


def layer_step(layer: Any, x: torch.Tensor, state: Any, mask: torch.Tensor | None, shared_kv: Any,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, dict[str, Any]] | None:
    """``x [B, 1, d]`` after one decoding step of ``layer`` from ``state`` (``positions [B, 1]``: the
    token's position, for attention; default ``state.seen``) -> ``(h [B, 1, d], new state, the
    FFN's aux)``, or None where the Python layer must run (see the module docstring)."""
    if (mask is not None or shared_kv is not None or x.dim() != 3 or x.shape[1] != 1
            or x.device.type != "cpu" or x.dtype != torch.float32 or (layer.training and layer.drop.p)
            or torch.is_autocast_enabled("cpu")):
        return None
    kind, plan = _decision(layer)
    if kind == "python":
        return None
    attention = kind == "attention"
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return None
    if isinstance(state, RecurrentState) and not attention:
        if (state.ssm.shape[0] != x.shape[0] or state.ssm.dtype != torch.float32
                or state.conv.dtype != torch.float32 or not cpp_ext.layer_steps()):
            return None
        h, state = _fixed_state_step(layer, x[:, 0].contiguous(), state)
    elif isinstance(state, KVState) and attention:
        pos = (state.seen[:, None] if positions is None else positions.expand(x.shape[0], 1))[:, 0]
        codes = torch.int8 if isinstance(state, QuantKVState) else torch.float32  # FP8 codes: Python
        if (state.k.shape[0] != x.shape[0] or state.k.dtype != codes or state.v.dtype != codes
                or pos.dtype != torch.long or not bool((state.pos <= pos[:, None]).all())
                or not cpp_ext.layer_steps()):
            return None  # later positions in the cache: the Python layer's masks
        starts = _front_padding(state.key_mask)
        if starts is False:
            return None  # masked slots between seen ones: the Python layer's masks
        h, state = _attention_step(layer, x[:, 0].contiguous(), state, pos, plan, starts)
    elif kind == "liger" and isinstance(state, LinearizedState):
        window = state.window
        if (window is None or layer.mixer.exact_softmax or type(window) is not KVState
                or window.k.dtype != torch.float32
                or state.ssm.dtype != torch.float32 or state.ssm.shape[0] != x.shape[0]
                or not cpp_ext.layer_steps()):
            return None
        pos = (window.seen[:, None] if positions is None else positions.expand(x.shape[0], 1))[:, 0]
        stepped = _liger_step(layer, x[:, 0].contiguous(), state, window, pos, plan)
        if stepped is None:
            return None
        h, state = stepped
    else:
        return None
    return _ffn_step(layer, h, state)


def _dense_ffn(layer: Any) -> tuple[list[Any], float]:
    """The dense FFN's weights and norm eps as the layer kernels take them (``None``s and 0 when
    there is none or an MoE, which runs in its own call)."""
    if not isinstance(layer.ffn, SwiGLU):
        return [None, None, None], 0.0
    return [layer.ffn_norm.weight, layer.ffn.w_in.weight, layer.ffn.w_out.weight], _eps(layer.ffn_norm)


def _fixed_state_step(layer: Any, x: torch.Tensor,
                      state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
    mixer = layer.mixer
    args = _mixer_args(mixer)
    if args is None:
        raise RuntimeError(f"no layer kernel computes a {type(mixer).__name__} (decide() chose one)")
    op, specific = args
    ffn, ffn_eps = _dense_ffn(layer)
    h, conv, ssm = getattr(torch.ops.looplm, op)(
        x, state.conv.contiguous(), state.ssm.contiguous(), layer.mixer_norm.weight, mixer.qkv.weight,
        mixer.conv_weight, mixer.g_proj.weight, mixer.norm.weight, mixer.o_proj.weight, *ffn,
        _eps(layer.mixer_norm), _eps(mixer.norm), ffn_eps, *specific)
    return h, RecurrentState(conv, ssm)


def _front_padding(key_mask: torch.Tensor) -> torch.Tensor | None | Literal[False]:
    """Each row's first seen slot ``[B]`` when ``key_mask [B, S]`` is False only in a run at the
    front of each row; None when every slot is seen; False otherwise."""
    if bool(key_mask.all()):
        return None
    starts = (~key_mask).sum(1)
    seen = torch.arange(key_mask.shape[1], device=key_mask.device) >= starts[:, None]
    return starts if bool((seen == key_mask).all()) else False


def _attention_step(layer: Any, x: torch.Tensor, state: KVState, pos: torch.Tensor,
                    plan: tuple[Any, ...], starts: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, KVState]:
    """Attention layer step: projections and RoPE in C++, the cache append in Python
    (:mod:`looplm.layers.kv_cache`; an int8 cache quantises the new rows), attention over the
    cache (read as int8 codes and scales where it is held so) and the rest in C++."""
    mixer = layer.mixer
    H, Hkv, D = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
    inv_freq = getattr(mixer, "_inv_freq", None)
    if inv_freq is None or inv_freq.device != x.device:  # computed once per mixer
        inv_freq = mixer._inv_freq = rope_inv_freq(D, mixer.rope_base, x.device, mixer.rope_scaling)
    qkv_w, o_w, ffn, ffn_eps = plan
    qkv = torch.ops.looplm.attn_step_in(x, layer.mixer_norm.weight, _eps(layer.mixer_norm), qkv_w, inv_freq,
                                        pos, H, Hkv)
    B = x.shape[0]
    k, v = qkv[:, None, H:H + Hkv], qkv[:, None, H + Hkv:]
    ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
    new = kv_cache.append_rows(state, k, v, ones, pos[:, None], state.seen + 1)
    scales = (new.k_scale, new.v_scale) if isinstance(new, QuantKVState) else (None, None)
    h = torch.ops.looplm.attn_step_out(x, qkv[:, :H].contiguous(), new.k, new.v, o_w, *ffn, ffn_eps, starts,
                                       *scales)
    return h, new


def _liger_step(layer: Any, x: torch.Tensor, state: LinearizedState, window: KVState, pos: torch.Tensor,
                plan: tuple[Any, ...]) -> tuple[torch.Tensor, LinearizedState] | None:
    """Liger GLA layer step: norm and projection in Python (any projection module), the recurrence
    and RoPE in C++ (``liger_gla_step``), the window's cache append in Python, then the window's
    attention averaged with the recurrence's output, the output projection and the FFN in C++
    (``attn_step_out``); the window's cache kept as :func:`_kept_window` says. None (nothing kept)
    where some row's keys inside the window are not one run at the end of its cache (the Python
    layer's masks)."""
    mixer = layer.mixer
    H, Hkv, D, W = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, mixer.window
    B = x.shape[0]
    inv_freq = getattr(mixer, "_inv_freq", None)
    if inv_freq is None or inv_freq.device != x.device:  # computed once per mixer
        inv_freq = mixer._inv_freq = rope_inv_freq(D, mixer.rope_base, x.device, mixer.rope_scaling)
    qkv = mixer.qkv(layer.mixer_norm(x)).view(B, H + 2 * Hkv, D)
    o, ssm, qk = torch.ops.looplm.liger_gla_step(qkv, state.ssm, H, Hkv, float(mixer.gate_tau), inv_freq, pos)
    ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
    cache = kv_cache.append(window, qk[:, None, H:], qkv[:, None, H + Hkv:], ones, pos[:, None],
                            window.seen + 1)
    seen = cache.key_mask & (cache.pos > pos[:, None] - W) & (cache.pos <= pos[:, None])
    starts = _front_padding(seen)
    if starts is False:
        return None
    _, o_w, ffn, ffn_eps = plan
    q = qk[:, :H].contiguous()
    h = torch.ops.looplm.attn_step_out(x, q, cache.k, cache.v, o_w, *ffn, ffn_eps, starts, None, None, o)
    return h, LinearizedState(ssm, _kept_window(cache, W))


def _kept_window(cache: KVState, window: int) -> KVState:
    """A C++ step's window cache after its append: trimmed to the window (:func:`trim_window`) only
    once it holds twice the window, so that its slots are copied once per ``window`` steps instead of
    every step (the kernels read each row from its first key inside the window)."""
    return cache if cache.k.shape[1] < 2 * window else trim_window(cache, window)


def _padded(parts: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return [*parts, *_NONE3[len(parts):]]


def _layout(state: KVState) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(until, starts)`` of ``state``'s cache when each row's unused slots (``key_mask`` False) are
    one run at its front: each row's latest position among its seen slots ``[B]`` (-1: none) and
    its first seen slot ``[B]`` (None: every slot is seen); None when a masked slot lies between
    seen ones. Kept on the state: a stack step's states carry it, others pay a read."""
    known = vars(state).get("_layout")
    if known is not None:
        return known
    if state.k.shape[1] == 0:
        layout: tuple[torch.Tensor, torch.Tensor | None] = (state.seen.new_full(state.seen.shape, -1), None)
    else:
        starts = _front_padding(state.key_mask)
        if starts is False:
            return None
        pos = state.pos if starts is None else state.pos.masked_fill(~state.key_mask, -1)
        layout = (pos.amax(1), starts)
    vars(state)["_layout"] = layout  # kept beside the dataclass fields
    return layout


def stack_plan(layers: list[Any]) -> tuple[tuple[Any, ...], list[torch.Tensor | None], list[float]] | None:
    """What :func:`stack_step` needs of ``layers`` that does not change from step to step: their
    shared heads, RoPE, each layer's window (0: attention) and the linearised layers' gate
    temperature ``(H, Hkv, D, rope_base, rope_scaling, windows, tau)``, the kernels' weight list and
    the norms' eps; None unless every layer is attention or Liger GLA with a window (decided for
    their kernels) with a dense SwiGLU FFN or none, the same heads and RoPE (and one temperature),
    and the layer steps are on (:func:`looplm.ops.cpp_ext.layer_steps`). Kept on the first layer for
    the same layers and training flags until a module, parameter or buffer is registered anywhere
    (as :func:`decide`'s decisions): a decoding step does not rebuild it."""
    if (not layers or not cpp_ext.available() or not cpp_ext.layer_steps()
            or type(layers[0].mixer) not in (Attention, LigerGLA)):
        return None
    key = (_registrations[0], tuple(map(id, layers)), tuple(layer.training for layer in layers))
    cached = layers[0].__dict__.get("_stack_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _stack_plan(layers)
    layers[0].__dict__["_stack_plan"] = (key, plan)
    return plan


def _stack_plan(layers: list[Any]) -> tuple[tuple[Any, ...], list[torch.Tensor | None], list[float]] | None:
    first = layers[0].mixer
    rope = (first.n_heads, first.n_kv_heads, first.head_dim, first.rope_base, first.rope_scaling)
    weights: list[torch.Tensor | None] = []
    eps: list[float] = []
    windows: list[int] = []
    taus = set()
    for layer in layers:
        mixer = layer.mixer
        liger = type(mixer) is LigerGLA
        if ((type(mixer) is not Attention and not liger) or (layer.training and layer.drop.p)
                or not (layer.ffn is None or type(layer.ffn) is SwiGLU)
                or (mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, mixer.rope_base,
                    mixer.rope_scaling) != rope):
            return None
        kind, plan = _decision(layer)
        if kind != ("liger" if liger else "attention"):
            return None
        qkv_w, o_w, (ffn_norm, ffn_in, ffn_out), ffn_eps = plan
        weights += [layer.mixer_norm.weight, *_padded(qkv_w), *_padded(o_w), ffn_norm, *_padded(ffn_in),
                    *_padded(ffn_out)]
        eps += [_eps(layer.mixer_norm), ffn_eps]
        windows.append(mixer.window if liger else 0)
        if liger:
            taus.add(float(mixer.gate_tau))
    if len(taus) > 1:
        return None
    return (*rope, windows, taus.pop() if taus else 16.0), weights, eps


def stack_step(layers: list[Any], x: torch.Tensor, states: list[Any],
               positions: torch.Tensor) -> tuple[torch.Tensor, list[Any]] | None:
    """A decoding step of attention layers in a row in one C++ call (``attn_stack_step``, each
    cache appended in place in its buffer, :func:`looplm.layers.kv_cache.reserve`): ``x [B, 1, d]``,
    ``states`` the layers' KVStates, ``positions [B, 1]`` the token's position -> ``(h [B, 1, d],
    new states)``, or None where :func:`layer_step` per layer must run (its conditions, plus
    :func:`stack_plan`'s, every cache float32 or every one int8 (QuantKVState: the kernel quantises
    the new rows as :func:`looplm.ops.kv_quant.quantize_rows` does), no autograd at all, every
    cached key not after the token, unused slots only in a run at the front of each row: caches of
    different lengths in one batch, as :func:`looplm.state.cat_states` joins them). Liger GLA
    layers with a window may be among them (LinearizedStates: their window's cache is appended as
    an attention cache, trimmed to the window once it holds twice the window, as
    :func:`_liger_step` does; float32 caches, one token per row). One row (``B = 1``, no unused
    slot) may also bring T > 1 tokens to attention layers (``x [1, T, d]``, ``positions [1, T]``
    consecutive; float32 caches): ``attn_stack_verify``, causal among them (speculative decoding's
    verification)."""
    if (torch.is_grad_enabled() or x.dim() != 3 or (x.shape[1] != 1 and x.shape[0] != 1)
            or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or positions.dtype != torch.long):
        return None
    T = x.shape[1]
    planned = stack_plan(layers)
    if planned is None or len(states) != len(layers):
        return None
    rope, weights, eps = planned
    windows, tau = rope[5], rope[6]
    first, B = layers[0].mixer, x.shape[0]
    linearised = [isinstance(state, LinearizedState) for state in states]
    if any(lin != bool(w) for lin, w in zip(linearised, windows)):
        return None
    if any(linearised) and (T > 1 or any(s.ssm.shape[0] != B or s.ssm.dtype != torch.float32
                                         or layer.mixer.exact_softmax  # the test hook: Python refuses
                                         for s, lin, layer in zip(states, linearised, layers) if lin)):
        return None
    caches = [state.window if lin else state for state, lin in zip(states, linearised)]
    kind_of_cache = type(caches[0]) if caches else KVState
    if kind_of_cache not in (KVState, QuantKVState) or (any(linearised) and kind_of_cache is not KVState):
        return None
    if T > 1 and kind_of_cache is not KVState:
        return None
    codes = torch.int8 if kind_of_cache is QuantKVState else torch.float32
    if any(type(cache) is not kind_of_cache or cache.k.shape[0] != B or cache.k.dtype != codes
           or cache.v.dtype != codes for cache in caches):
        return None
    maybe = [_layout(cache) for cache in caches]
    layouts = [u for u in maybe if u is not None]
    if len(layouts) < len(maybe):
        return None  # masked slots between seen ones: the Python layer's masks
    untils = {id(until): until for until, _ in layouts}  # the layers of one step share one
    if any(not bool((until <= positions[:, 0]).all()) for until in untils.values()):
        return None  # later positions in a cache: the Python layer's masks
    if T > 1 and any(starts is not None for _, starts in layouts):
        return None  # verification reads every slot
    last = positions[:, -1].clone()  # each row's latest position after the step
    inv_freq = getattr(first, "_inv_freq", None)
    if inv_freq is None or inv_freq.device != x.device:  # computed once per mixer
        inv_freq = rope_inv_freq(first.head_dim, first.rope_base, x.device, first.rope_scaling)
        first._inv_freq = inv_freq
    buffers = [kv_cache.reserve(cache, T) for cache in caches]
    lengths = [cache.k.shape[1] for cache in caches]
    parts = [p for buf in buffers for p in buf.parts]
    ssm_out = [torch.empty_like(state.ssm) for state, lin in zip(states, linearised) if lin]
    if T == 1:
        ssm = [state.ssm if lin else None for state, lin in zip(states, linearised)] if ssm_out else []
        h = torch.ops.looplm.attn_stack_step(
            x[:, 0].contiguous(), weights, eps, inv_freq, positions[:, 0], rope[0], rope[1], parts, lengths,
            [starts for _, starts in layouts], ssm, ssm_out, windows if ssm_out else [], tau)[:, None]
    else:
        h = torch.ops.looplm.attn_stack_verify(x[0].contiguous(), weights, eps, inv_freq, positions[0],
                                               rope[0], rope[1], parts, lengths)[None]
    seen: dict[int, torch.Tensor] = {}  # states sharing a seen tensor share the next one
    new: list[Any] = []
    recurrent = iter(ssm_out)
    for buf, cache, S, (_, starts), W in zip(buffers, caches, lengths, layouts, windows):
        if id(cache.seen) not in seen:
            seen[id(cache.seen)] = cache.seen + T
        out = kv_cache.grown(buf, S + T, seen[id(cache.seen)], kind_of_cache)
        vars(out)["_layout"] = (last, starts)  # the new slots are seen and the latest: the same front runs
        if W:
            new.append(LinearizedState(next(recurrent), _kept_window(out, W)))
        else:
            new.append(out)
    return h, new


def _ffn_step(layer: Any, h: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """An MoE FFN's step (``csrc/moe_step.cpp``) after the layer kernel; a dense one ran inside it."""
    ffn, aux = layer.ffn, {}
    if isinstance(ffn, MoE):
        shared = ffn.shared
        h, load, balance, z_loss = torch.ops.looplm.moe_step(
            h, layer.ffn_norm.weight, _eps(layer.ffn_norm), ffn.router.weight, ffn.w_in, ffn.w_out,
            None if shared is None else shared.w_in.weight, None if shared is None else shared.w_out.weight,
            ffn.top_k, ffn.renormalize)
        aux = {"balance_loss": balance, "z_loss": z_loss, "load": load}
    return h[:, None], state, aux


def _eps(norm: RMSNorm) -> float:
    return float(norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps)
