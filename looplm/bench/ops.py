"""``looplm bench ops``: tokens/s of the token-mixer ops against sequence length.

Contenders (all on identical random inputs, ``[B, T, H, D]``, float32):

- the chunk form of every fixed-state mixer of the registry (:data:`looplm.layers.mixers.MIXERS`,
  whose entries name their op family and gate; one per op form): ``linear``, ``retention`` (constant per-head
  decay), ``simple_gla`` (one decay per head, as Mamba-2), ``gla`` (gate over the key dim) from
  :func:`looplm.ops.linear_attn.decay_chunk`; ``deltanet`` and ``gated_deltanet`` from
  :func:`looplm.ops.delta_rule.delta_chunk`;
- ``attention``: causal softmax attention, ``scaled_dot_product_attention(is_causal=True)``;
- ``hf_gated_deltanet``: transformers' pure-PyTorch chunked gated delta rule (the Qwen3-Next
  fallback), a peer whose output is checked against ``gated_deltanet``.

Each is timed forward-only (under ``no_grad``) and forward+backward (``autograd.grad`` of the
output against a fixed random cotangent, w.r.t. every input); contenders alternate within every
repeat, medians are reported.

FLOPs are counted from what each op runs (:func:`forward_flops`): torch's FlopCounterMode over
one forward (matmuls), plus the triangular solve it does not see (the transformers peer; ours
inverts ``A`` with matmuls) and, for SDPA, the causal half
of ``2 T^2 (dk+dv)`` per head. Elementwise work is not counted. Forward+backward is counted as 3x
the forward. The fraction reported is that rate over the machine's own float32 matmul throughput
(a large square matmul timed in the same run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, bmm_flop

from looplm.argtypes import positive_int
from looplm.bench.common import (
    machine_info,
    markdown_table,
    matmul_gflops,
    parse_int_list,
    pass_fail,
    time_interleaved,
    write_json,
)
from looplm.layers.mixers import MIXERS as MIXER_REGISTRY
from looplm.layers.mixers import MixerSpec
from looplm.ops import cpp_ext
from looplm.ops.delta_rule import delta_chunk, delta_step
from looplm.ops.linear_attn import decay_chunk, decay_step

# one contender per op form: the first fixed-state mixer of the registry with each (op, gate)
_FORMS = {(s.op, s.gate): name for name, s in reversed(MIXER_REGISTRY.items()) if not s.kv_cache}
FIXED_STATE = tuple(name for name in MIXER_REGISTRY if name in _FORMS.values())
PEER = "hf_gated_deltanet"
MIXERS = (*FIXED_STATE, "attention", PEER)
GATES = {None: None, "const": "g_const", "head": "g_head", "dim": "g_dim"}  # MixerSpec.gate -> Inputs field
DEFAULT_LENS = "512,1024,2048,4096,8192,16384"
CHUNK = 64  # decay family and the transformers peer (their default)
DELTA_CHUNK = 32  # delta rule: fastest here (measured 32 / 64 / 128 at T = 2048, 8192)


@dataclass
class Inputs:
    """Random inputs of one sequence length; gates and beta as the layers would make them."""

    q: torch.Tensor
    k: torch.Tensor  # L2-normalised (delta rule)
    v: torch.Tensor
    beta: torch.Tensor  # [B, T, H] in (0, 1)
    g_head: torch.Tensor  # [B, T, H] log-decay <= 0 (scalar gate)
    g_dim: torch.Tensor  # [B, T, H, dk] log-decay <= 0 (GLA, tau = 16)
    g_const: torch.Tensor  # [B, T, H] constant per head (retention), no gradient

    @staticmethod
    def make(b: int, t: int, h: int, dk: int, dv: int, seed: int = 0) -> Inputs:
        gen = torch.Generator().manual_seed(seed)

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen)

        gamma = 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32))  # RetNet's per-head decays
        x = Inputs(
            q=rnd(b, t, h, dk), k=F.normalize(rnd(b, t, h, dk), dim=-1), v=rnd(b, t, h, dv),
            beta=torch.sigmoid(rnd(b, t, h)), g_head=F.logsigmoid(rnd(b, t, h) + 3),
            g_dim=F.logsigmoid(rnd(b, t, h, dk)) / 16, g_const=gamma.log().expand(b, t, h).contiguous(),
        )
        for name in ("q", "k", "v", "beta", "g_head", "g_dim"):
            getattr(x, name).requires_grad_()
        return x


def _decay(g_name: str | None) -> Callable[[Inputs], Any]:
    def run(x: Inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        g = None if g_name is None else getattr(x, g_name)
        o, _ = decay_chunk(x.q, x.k, x.v, g, chunk_size=CHUNK)
        return o, [x.q, x.k, x.v] + ([g] if g is not None and g.requires_grad else [])

    return run


def _delta(gated: bool) -> Callable[[Inputs], Any]:
    def run(x: Inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        g = x.g_head if gated else None
        o, _ = delta_chunk(x.q, x.k, x.v, x.beta, g, chunk_size=DELTA_CHUNK)
        return o, [x.q, x.k, x.v, x.beta] + ([g] if g is not None else [])

    return run


def _attention(x: Inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    q, k, v = (t.transpose(1, 2) for t in (x.q, x.k, x.v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2), [x.q, x.k, x.v]


def _hf(x: Inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    o, _ = torch_chunk_gated_delta_rule(x.q, x.k, x.v, x.g_head, x.beta, chunk_size=CHUNK)
    return o, [x.q, x.k, x.v, x.beta, x.g_head]


def _runner(spec: MixerSpec) -> Callable[[Inputs], Any]:
    """The chunk form (or SDPA) a registered mixer runs, fed the gate its entry names."""
    if spec.op == "attention":
        return _attention
    if spec.op == "delta":
        return _delta(spec.gate is not None)
    return _decay(GATES[spec.gate])


RUNNERS: dict[str, Callable[[Inputs], Any]] = {
    **{name: _runner(MIXER_REGISTRY[name]) for name in (*FIXED_STATE, "attention")}, PEER: _hf}


def _baddbmm_inplace_flops(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None,
                           **kwargs: Any) -> int:
    """``x.baddbmm_(a, b)`` counts as ``a @ b`` (torch's counter has no formula for the in-place op)."""
    return bmm_flop(a_shape, b_shape)


_INPLACE_FLOPS = {torch.ops.aten.baddbmm_: _baddbmm_inplace_flops}


def forward_flops(mixer: str, x: Inputs) -> float:
    """Forward FLOPs of ``mixer`` on ``x``: the matmuls torch's FlopCounterMode sees in one forward
    (in-place ``baddbmm_`` included; for the delta rule those of its PyTorch form, which the C++ kernel
    runs too), plus what it cannot see: the transformers peer's triangular
    solve (``n^2 w`` for an ``n x n`` system with ``w`` right-hand sides; ours inverts with
    matmuls, which are counted) and SDPA (``2 T^2 (dk+dv)`` per head, halved: causal)."""
    b, t, h, dk = x.q.shape
    dv = x.v.shape[-1]
    if mixer == "attention":
        return float(b * h * t * t * (dk + dv))
    counter = FlopCounterMode(display=False, custom_mapping=_INPLACE_FLOPS)
    with torch.no_grad(), cpp_ext.kernels("torch"), counter:
        RUNNERS[mixer](x)
    flops = counter.get_total_flops()
    if mixer == PEER:
        c = min(CHUNK, t)
        flops += b * h * -(-t // c) * c * c * (dk + dv)  # its triangular solve of the chunk's A
    return float(flops)


def _timed(mixer: str, x: Inputs, backward: bool) -> Callable[[], Any]:
    run = RUNNERS[mixer]
    if not backward:
        def fwd() -> None:
            with torch.no_grad():
                run(x)
        return fwd
    cot = torch.randn(x.v.shape, generator=torch.Generator().manual_seed(1))

    def fwd_bwd() -> None:
        o, inputs = run(x)
        torch.autograd.grad(o, inputs, cot)
    return fwd_bwd


def _peer_error(x: Inputs) -> float:
    """Max |ours - transformers'| over max |transformers'| for the gated delta rule."""
    with torch.no_grad():
        ours, _ = RUNNERS["gated_deltanet"](x)
        theirs, _ = _hf(x)
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))


def step_time(mixer: str, position: int, h: int, dk: int, dv: int, steps: int) -> Callable[[], Any]:
    """A closure decoding ``steps`` tokens with ``mixer``'s step form, starting from the state a
    chunked prefill of ``position`` tokens left (batch 1)."""
    x = Inputs.make(1, position + steps, h, dk, dv, seed=2)
    q, k, v, beta = (t.detach() for t in (x.q, x.k, x.v, x.beta))
    spec = MIXER_REGISTRY[mixer]
    gate = GATES[spec.gate]
    g = None if gate is None else getattr(x, gate).detach()
    gp = None if g is None else g[:, :position]
    delta = spec.op == "delta"
    with torch.no_grad():
        if delta:
            _, state0 = delta_chunk(q[:, :position], k[:, :position], v[:, :position], beta[:, :position], gp)
        else:
            _, state0 = decay_chunk(q[:, :position], k[:, :position], v[:, :position], gp)

    def decode() -> None:
        state = state0
        with torch.no_grad():
            for i in range(position, position + steps):
                gi = None if g is None else g[:, i]
                if delta:
                    _, state = delta_step(q[:, i], k[:, i], v[:, i], beta[:, i], gi, state=state)
                else:
                    _, state = decay_step(q[:, i], k[:, i], v[:, i], gi, state=state)
    return decode


def crossover(lens: list[int], ours: dict[int, float], attn: dict[int, float]) -> str:
    """The shortest measured length from which ``ours`` has at least attention's tokens/s at every
    longer measured length; ``">max"`` if never."""
    best = None
    for t in reversed(lens):
        if ours[t] >= attn[t]:
            best = t
        else:
            break
    if best is None:
        return f">{lens[-1]}"
    return f"<={best}" if best == lens[0] else str(best)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``looplm bench ops``."""
    parser.add_argument("--seq-lens", default=DEFAULT_LENS, help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point (median)")
    parser.add_argument("--mixers", default=",".join(MIXERS), help=f"subset of {','.join(MIXERS)}")
    parser.add_argument("--step-positions", default="256,16384", help="two prefill lengths for the step form")
    parser.add_argument("--out", default="bench_results/ops", help="results directory (JSON, PNG)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny sizes)")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    lens = parse_int_list(args.seq_lens, "--seq-lens")
    positions = parse_int_list(args.step_positions, "--step-positions")
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    unknown = sorted(set(mixers) - set(MIXERS))
    if unknown or not mixers:
        raise ValueError(f"--mixers must name some of {','.join(MIXERS)}, got {args.mixers!r}")
    for flag in ("batch", "heads", "dk", "dv", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    cfg = dict(lens=sorted(set(lens)), batch=args.batch, heads=args.heads, dk=args.dk, dv=args.dv,
               repeats=args.repeats, mixers=mixers, positions=positions, steps=64, matmul_n=2048)
    if args.quick:
        cfg.update(lens=[32, 96], heads=2, dk=16, dv=16, repeats=1, positions=[8, 64], steps=4, matmul_n=256)
    return cfg


def _targets(cfg: dict[str, Any], tps: dict[str, dict[str, dict[int, float]]],
             step: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """The issue's targets as ``{name, value, threshold, ok}``; ``ok=None`` when not measured."""
    fb = tps["fwd+bwd"]
    out = []

    def ratio(a: str, b: str, t: int) -> float | None:
        return fb[a][t] / fb[b][t] if a in fb and b in fb and t in fb[a] and t in fb[b] else None

    for t, need in ((2048, 3.0), (8192, 5.0)):
        r = ratio("gated_deltanet", PEER, t)
        out.append(dict(name=f"gated_deltanet fwd+bwd / transformers fallback at T={t}", value=r,
                        threshold=f">= {need}", ok=None if r is None else r >= need))
    r = ratio("gla", "attention", 8192)
    out.append(dict(name="gla fwd+bwd / attention at T=8192", value=r, threshold=">= 3.0",
                    ok=None if r is None else r >= 3.0))
    for m in (m for m in FIXED_STATE if m in fb):
        has = 2048 in fb[m] and 16384 in fb[m]
        r = fb[m][16384] / fb[m][2048] if has else None
        out.append(dict(name=f"{m} fwd+bwd tokens/s T=16384 / T=2048 (linear in T)", value=r,
                        threshold=">= 0.75", ok=None if r is None else r >= 0.75))
    p0, p1 = cfg["positions"][0], cfg["positions"][-1]
    for m, times in step.items():
        r = times[p1] / times[p0]
        out.append(dict(name=f"{m} step time at position {p1} / {p0}", value=r, threshold="within 10%",
                        ok=abs(r - 1) <= 0.10 if not cfg.get("quick") else None))
    return out


def _plot(cfg: dict[str, Any], tps: dict[str, dict[str, dict[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for m, series in tps[mode].items():
            ts = sorted(series)
            ax.plot(ts, [series[t] for t in ts], marker="o", label=m, linestyle="--" if m == PEER else "-")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=mode)
        ax.set_xticks(cfg["lens"], [str(t) for t in cfg["lens"]])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("tokens/s")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"token-mixer ops, B={cfg['batch']} H={cfg['heads']} dk={cfg['dk']} dv={cfg['dv']} float32")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables and targets, write ``ops.json`` and ``ops.png``."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    cfg["quick"] = bool(args.quick)
    b, h, dk, dv, lens, mixers = (cfg[x] for x in ("batch", "heads", "dk", "dv", "lens", "mixers"))
    if PEER in mixers and dk != dv:
        raise ValueError("the transformers peer needs --dk equal to --dv; drop it from --mixers")
    info = machine_info()
    peak = matmul_gflops(cfg["matmul_n"])
    print(f"bench ops: B={b} H={h} dk={dk} dv={dv} float32, chunk {CHUNK} (delta rule {DELTA_CHUNK}), "
          f"repeats {cfg['repeats']}, threads {info['torch_threads']}, load {info['load_average_1min']}")
    print(f"machine float32 matmul ({cfg['matmul_n']}^2): {peak:.1f} GFLOP/s  [{info['cpu']}]")

    tps: dict[str, dict[str, dict[int, float]]] = {"fwd": {}, "fwd+bwd": {}}
    rows, records, peer_err = [], [], {}
    for t in lens:
        x = Inputs.make(b, t, h, dk, dv)
        if PEER in mixers and "gated_deltanet" in mixers:
            peer_err[t] = _peer_error(x)
        flops = {m: forward_flops(m, x) for m in mixers}
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            secs = time_interleaved({m: _timed(m, x, backward) for m in mixers}, cfg["repeats"])
            for m, s in secs.items():
                rate = b * t / s
                gflops = flops[m] / s * (3 if backward else 1) / 1e9
                tps[mode].setdefault(m, {})[t] = rate
                records.append(dict(mixer=m, T=t, mode=mode, seconds=s, tokens_per_s=rate,
                                    gflops=gflops, peak_fraction=gflops / peak))
        rates = ", ".join(f"{m} {tps['fwd'][m][t]:,.0f}/{tps['fwd+bwd'][m][t]:,.0f}" for m in mixers)
        print(f"  T={t} tokens/s fwd/fwd+bwd: {rates}", flush=True)

    for m in mixers:
        row: list[Any] = [m]
        for t in lens:
            row.append(f"{tps['fwd'][m][t]:,.0f} / {tps['fwd+bwd'][m][t]:,.0f}")
        frac = [r["peak_fraction"] for r in records if r["mixer"] == m and r["mode"] == "fwd+bwd"]
        row.append(f"{max(frac):.0%}")
        rows.append(row)
    table = markdown_table(["mixer", *(f"T={t}" for t in lens), "peak frac"], rows)
    print("\ntokens/s, forward / forward+backward (peak frac: best fwd+bwd FLOP rate over matmul's)")
    print(table)

    cross: dict[str, Any] = {}
    if "attention" in mixers:
        for mode in ("fwd", "fwd+bwd"):
            for m in (m for m in FIXED_STATE if m in mixers):
                cross.setdefault(m, {})[mode] = crossover(lens, tps[mode][m], tps[mode]["attention"])
        print("\ncrossover (shortest T from which the mixer beats causal SDPA), fwd / fwd+bwd:")
        for m, c in cross.items():
            print(f"  {m:15s} {c['fwd']:>7s} / {c['fwd+bwd']}")
    if peer_err:
        worst = max(peer_err.values())
        print(f"\ngated_deltanet vs transformers fallback: max relative output error {worst:.2e}")

    step: dict[str, dict[int, float]] = {}
    step_mixers = [m for m in FIXED_STATE if m in mixers]
    if step_mixers:
        p0, p1 = cfg["positions"][0], cfg["positions"][-1]
        fns = {(m, p): step_time(m, p, h, dk, dv, cfg["steps"]) for m in step_mixers for p in (p0, p1)}
        secs = time_interleaved({f"{m}@{p}": f for (m, p), f in fns.items()}, max(cfg["repeats"], 5))
        print(f"\nstep form, batch 1, microseconds per token after {p0} / {p1} tokens:")
        for m in step_mixers:
            step[m] = {p: secs[f"{m}@{p}"] / cfg["steps"] for p in (p0, p1)}
            print(f"  {m:15s} {step[m][p0] * 1e6:7.1f} / {step[m][p1] * 1e6:7.1f}")

    targets = _targets(cfg, tps, step)
    print("\ntargets:")
    for tg in targets:
        value = "-" if tg["value"] is None else f"{tg['value']:.2f}"
        print(f"  {pass_fail(tg['ok']):4s} {tg['name']}: {value} ({tg['threshold']})")

    out = Path(args.out)
    argv = sys.argv[sys.argv.index("bench"):] if "bench" in sys.argv else ["bench", "ops"]
    result = dict(command=" ".join(["looplm", *argv]), config=cfg, machine=info, matmul_gflops=peak,
                  records=records, table=table,
                  crossover=cross, peer_max_rel_error=peer_err, step_seconds_per_token=step, targets=targets)
    path = write_json(out, "ops.json", result)
    _plot(cfg, tps, out / "ops.png")
    print(f"\nwrote {path} and {out / 'ops.png'}")
    return 0


__all__ = ["add_arguments", "run", "forward_flops", "crossover", "MIXERS"]
