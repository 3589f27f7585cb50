"""Helpers shared by the benches: side-by-side timing, markdown tables, JSON results, machine facts.

Speed claims are ratios measured in one run: :func:`time_interleaved` alternates the contenders
within every repeat so that a busy machine slows them alike, and reports medians.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from looplm.errors import ConfigError
from looplm.model import LoopLM


def causal_lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Training loss on ``x [B, T]`` with next tokens ``y [B, T]`` for a LoopLM (LM + auxiliary
    losses; compiled or not) or a transformers causal LM (which shifts ``labels`` itself, so it
    gets ``x``)."""
    if isinstance(getattr(model, "_orig_mod", model), LoopLM):
        out = model(x, y)
        return out.loss + out.aux_loss
    return model(input_ids=x, labels=x, use_cache=False).loss


def time_once(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Median wall seconds of each function; every repeat calls all of them in turn.

    ``warmup`` untimed rounds come first (allocator, thread pools, lazy imports).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    return time_interleaved({"fn": fn}, repeats, warmup)["fn"]


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The machine's own dense matmul throughput: GFLOP/s of an ``n x n`` by ``n x n`` product
    (``2 n^3`` FLOPs), median of ``repeats``, with torch's current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats, warmup=1)
    return 2 * n**3 / seconds / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, core and thread counts, library versions and load: what a reader needs to compare runs."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": None if load is None else round(load[0], 2),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits, ints thousands separators."""

    def cell(x: Any) -> str:
        if isinstance(x, bool) or x is None:
            return "-" if x is None else str(x)
        if isinstance(x, int):
            return f"{x:,}"
        if isinstance(x, float):
            return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(out_dir: str | os.PathLike, name: str, data: Any) -> Path:
    """Write ``data`` to ``out_dir/name`` (``.json`` added if missing), creating the directory."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    path = path / (name if name.endswith(".json") else name + ".json")
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def parse_int_list(text: str, name: str) -> list[int]:
    """``"512,1024"`` -> ``[512, 1024]``; a ConfigError (a ValueError: the CLI prints one line)
    naming the flag for anything else."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(x < 1 for x in values):
        raise ConfigError(f"{name} must be comma-separated positive integers, got {text!r}")
    return values


def pass_fail(ok: bool | None) -> str:
    """``PASS``, ``FAIL`` or ``n/a`` (not measured in this run)."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")
