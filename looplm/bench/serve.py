"""``looplm bench serve CHECKPOINT_DIR``: load test of ``looplm serve`` through the ``openai`` client.

Each server runs in its own process on loopback; the load comes from this process with the
official ``openai`` client (``AsyncOpenAI``, streaming completions, greedy) at each concurrency of
``--concurrency``: ``c`` workers send ``--requests`` requests in total (default ``2c``, at least
8) and stop starting new ones after ``--level-seconds``. Prompts are pieces of a fixed text (the
``os`` module's source, present in every Python) cut to ``--prompt-tokens`` tokens of the
checkpoint's tokenizer, lengths in turn. Servers, side by side in one run:

- ``looplm``: continuous batching (``--max-batch`` = the largest concurrency);
- ``looplm-serial``: the same server with ``--max-batch 1`` (one request at a time);
- ``llama.cpp``: ``llama-cpp-python``'s OpenAI server on ``--gguf`` (the same model), where the
  package is installed.

Per server and concurrency: requests/s and generated tokens/s (completed requests and their
tokens over the level's wall time), time to first token p50/p99 (request sent to first text),
inter-token latency p50/p99 (gaps between streamed text chunks), errors. looplm servers are
asked to ignore the end-of-text token (``ignore_eos``) so every request generates ``--max-tokens``;
token counts come from each stream's ``usage`` (looplm) or its chunks (llama.cpp, one token
each).

Decoding-state memory of ``--state-streams`` requests of ``--state-tokens`` tokens each, for an
attention, a gated DeltaNet and a hybrid (every 4th layer attention) model of the checkpoint's
width and layer count: one layer of each kind is prefilled with ``--state-tokens`` tokens in one
row and its state's ``nbytes()`` measured (rows and layers are independent, so the totals are
sums of these). Writes ``serve.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from looplm.bench.common import machine_info, markdown_table, parse_int_list, write_json
from looplm.checkpoint import load_config
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import LoopLMError
from looplm.model import LoopConfig, LoopLM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the looplm checkpoint to serve")
    parser.add_argument("--gguf", default=None, help="the same model as GGUF, for llama-cpp-python's server")
    parser.add_argument("--concurrency", default="1,4,16,64", help="concurrent streams per level")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 2c, >= 8)")
    parser.add_argument("--level-seconds", type=float, default=60.0,
                        help="stop starting requests of a level after this long")
    parser.add_argument("--prompt-tokens", default="32,128,256", help="prompt lengths, used in turn")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--servers", default="looplm,looplm-serial,llama.cpp",
                        help="which servers to load (those not available are skipped)")
    parser.add_argument("--threads", type=int, default=None, help="threads of each server (default: all)")
    parser.add_argument("--state-streams", type=int, default=64, help="streams of the state-memory table")
    parser.add_argument("--state-tokens", type=int, default=4096, help="tokens per stream of that table")
    parser.add_argument("--out", default="bench_results/serve")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LoopLMError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise LoopLMError(f"the server at {url} did not answer within {timeout:.0f} s")


class Server:
    """A server process on loopback: ``url``, ``model`` (its model id), ``extra`` request fields."""

    def __init__(self, name: str, cmd: list[str], port: int | None, extra: dict[str, Any],
                 timeout: float = 300) -> None:
        self.name, self.extra = name, extra
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if port is None:  # looplm serve --port 0 prints its address first
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            m = re.search(r"http://[\d.]+:(\d+)", line)
            if not m:
                self.close()
                raise LoopLMError(f"{name}: could not read the server's address from {line!r}")
            port = int(m.group(1))
        self.url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(self.url, self.proc, timeout)
            self.model = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _looplm(name: str, ckpt: str, max_batch: int, threads: int | None) -> Server:
    cmd = [sys.executable, "-m", "looplm.cli", "serve", ckpt, "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", "4096"]
    if threads:
        cmd += ["--threads", str(threads)]
    return Server(name, cmd, None, {"ignore_eos": True, "stream_options": {"include_usage": True}})


def _llama_cpp(gguf: str, threads: int | None) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048"]
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return Server("llama.cpp", cmd, port, {})


def prompts(checkpoint: str, lengths: list[int]) -> list[str]:
    """One prompt per length: consecutive pieces of the ``os`` module's source, each cut to that
    many tokens of the checkpoint's tokenizer."""
    tok = load_tokenizer(checkpoint)
    ids = tok.encode(Path(inspect.getsourcefile(os) or os.__file__).read_text())
    out, at = [], 0
    for n in lengths:
        out.append(tok.decode(ids[at:at + n]))
        at += n
    return out


async def _one(client: Any, server: Server, prompt: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    chunks, used = 0, None
    stream = await client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True, extra_body=server.extra)
    async for ch in stream:
        if getattr(ch, "usage", None) is not None:
            used = ch.usage.completion_tokens
        if ch.choices and ch.choices[0].text:
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last, chunks = now, chunks + 1
    return {"ttft": None if first is None else first - t0, "gaps": gaps, "tokens": used or chunks}


async def _level(server: Server, c: int, n: int, seconds: float, texts: list[str], max_tokens: int
                 ) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600,
                         http_client=None)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    counter = iter(range(n))
    start = time.perf_counter()

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() - start > seconds:
                return
            try:
                results.append(await _one(client, server, texts[i % len(texts)], max_tokens))
            except Exception as err:  # counted and reported, the load goes on
                errors.append(f"{type(err).__name__}: {err}")

    await asyncio.gather(*(worker() for _ in range(c)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"server": server.name, "concurrency": c, "requests": len(results), "errors": len(errors),
            "error_examples": errors[:3], "seconds": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "generated_tokens": tokens,
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
            "itl_p50": _pct(gaps, 50), "itl_p99": _pct(gaps, 99)}


def _layer_state_bytes(config: LoopConfig, mixer: str, tokens: int) -> int:
    """Bytes of one row's state of one ``mixer`` layer of ``config``'s width after ``tokens``."""
    over = dict(vocab_size=256, n_prelude=0, n_core=1, n_coda=0, n_recursions=1, router="none",
                sharing="cycle", capacity=None, kv_sharing=False, mixer=mixer, attn_every=0, ffn="none",
                max_seq_len=max(config.max_seq_len, tokens + 1))
    model = LoopLM(LoopConfig.from_dict({**config.to_dict(), **over})).eval()
    state = model.init_state(1)
    with torch.no_grad():
        for start in range(0, tokens, 1024):
            ids = torch.randint(0, 256, (1, min(1024, tokens - start)))
            state = model(ids, state=state, use_cache=True).state
    (layer,) = state.layers.values()
    return layer.nbytes()


def state_memory(config: LoopConfig, streams: int, tokens: int) -> list[dict[str, Any]]:
    """Decoding-state bytes of ``streams`` requests of ``tokens`` tokens: attention, gated
    DeltaNet and hybrid (every 4th layer attention) models of ``config``'s width and depth."""
    layers = config.n_prelude + config.n_core + config.n_coda
    attn = _layer_state_bytes(config, "attention", tokens)
    gdn = _layer_state_bytes(config, "gated_deltanet", tokens)
    rows = []
    for name, n_attn in (("attention", layers), ("gated_deltanet", 0), ("hybrid", max(1, layers // 4))):
        per_stream = n_attn * attn + (layers - n_attn) * gdn
        rows.append({"model": name, "layers": layers, "attention_layers": n_attn, "streams": streams,
                     "tokens": tokens, "bytes": streams * per_stream,
                     "vs_attention": per_stream / (layers * attn)})
    return rows


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def run(args: argparse.Namespace) -> int:
    levels = parse_int_list(args.concurrency, "--concurrency")
    lengths = parse_int_list(args.prompt_tokens, "--prompt-tokens")
    max_tokens, seconds = args.max_tokens, args.level_seconds
    if args.quick:
        levels, lengths, max_tokens, seconds = levels[:2] if len(levels) > 1 else levels, lengths[:2], 4, 20.0
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    texts = prompts(args.checkpoint, lengths)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in wanted:
        if name == "llama.cpp":
            if args.gguf is None:
                skipped[name] = "no --gguf given"
                continue
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                skipped[name] = "llama-cpp-python is not installed"
                continue
            server = _llama_cpp(args.gguf, args.threads)
        elif name in ("looplm", "looplm-serial"):
            batch = 1 if name == "looplm-serial" else max(levels)
            server = _looplm(name, args.checkpoint, batch, args.threads)
        else:
            raise LoopLMError(f"unknown server {name!r} in --servers (looplm, looplm-serial, llama.cpp)")
        try:
            warm = asyncio.run(_level(server, 1, 1, seconds, texts[:1], 2))  # first-call costs
            if warm["errors"]:
                code = server.proc.poll()
                skipped[name] = f"its first request failed: {warm['error_examples'][0]}" + (
                    "" if code is None else f" (the process exited with status {code})")
                continue
            for c in levels:
                n = args.requests or (c if args.quick else max(8, 2 * c))
                row = asyncio.run(_level(server, c, n, seconds, texts, max_tokens))
                rows.append(row)
                print(f"{name:14s} c={c:3d}: {row['requests']} requests, {row['tokens_per_s']:.1f} tok/s, "
                      f"{row['errors']} errors", flush=True)
                if server.proc.poll() is not None:  # it crashed: the remaining levels would only fail
                    skipped[name] = f"the server process exited with status {server.proc.returncode} at c={c}"
                    break
        finally:
            server.close()
    load_table = _report(rows, skipped, levels)
    streams, tokens = (4, 256) if args.quick else (args.state_streams, args.state_tokens)
    memory = state_memory(load_config(args.checkpoint), streams, tokens)
    memory_table = markdown_table(["model", "layers", "attention layers", "streams x tokens", "state MiB",
                                   "vs attention"],
                                  [[m["model"], m["layers"], m["attention_layers"], f"{streams} x {tokens}",
                                    m["bytes"] / 2**20, m["vs_attention"]] for m in memory])
    print(memory_table)
    write_json(args.out, "serve", {"settings": {"levels": levels, "prompt_tokens": lengths,
                                                "max_tokens": max_tokens, "level_seconds": seconds,
                                                "checkpoint": args.checkpoint, "gguf": args.gguf},
                                   "machine": machine_info(), "results": rows, "skipped": skipped,
                                   "state_memory": memory,
                                   "table": load_table + "\n\nDecoding-state memory:\n\n" + memory_table})
    return 0


def _report(rows: list[dict[str, Any]], skipped: dict[str, str], levels: list[int]) -> str:
    def ms(v: float | None) -> float | None:
        return None if v is None else 1000 * v

    table = [[r["server"], r["concurrency"], r["requests"], r["requests_per_s"], r["tokens_per_s"],
              ms(r["ttft_p50"]), ms(r["ttft_p99"]), ms(r["itl_p50"]), ms(r["itl_p99"]), r["errors"]]
             for r in rows]
    text = markdown_table(["server", "conc.", "requests", "req/s", "gen tok/s", "TTFT p50 ms", "TTFT p99 ms",
                           "ITL p50 ms", "ITL p99 ms", "errors"], table)
    print(text)
    by = {(r["server"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    lo, hi = min(levels), max(c for c in levels if c <= 16) if any(c <= 16 for c in levels) else None
    if hi and ("looplm", lo) in by and ("looplm", hi) in by and hi != lo:
        print(f"looplm: tokens/s at concurrency {hi} / at {lo}: {by['looplm', hi] / by['looplm', lo]:.2f}x")
    for c in levels:
        if ("looplm", c) in by and ("llama.cpp", c) in by:
            print(f"concurrency {c}: looplm / llama.cpp tokens/s {by['looplm', c] / by['llama.cpp', c]:.2f}x")
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    return text
