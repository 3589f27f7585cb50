"""``looplm bench serve CHECKPOINT_DIR``: load test of ``looplm serve`` through the ``openai`` client.

Each server runs in its own process on loopback; the load comes from this process with the
official ``openai`` client (``AsyncOpenAI``, streaming completions, greedy; on uvloop's event loop
where installed, which spends less of the cores the servers share) at each concurrency of
``--concurrency``: ``c`` workers send ``--requests`` requests in total (default ``2c``, at least
8) and stop starting new ones after ``--level-seconds``. Prompts are pieces of a fixed text (the
``os`` module's source, present in every Python) cut to ``--prompt-tokens`` tokens of the
checkpoint's tokenizer, lengths in turn; each request generates ``--max-tokens`` (128, vLLM's
``benchmark_serving`` default output length). Servers, side by side in one run:

- ``looplm``: continuous batching (``--max-batch`` = the largest concurrency);
- ``looplm-int4``: the same on the checkpoint's int4 copy (``--int4-checkpoint``, or one written
  for the run into a temporary directory: every linear, the embedding and the head in groups of
  32, as the engine table's int4 model);
- ``looplm-bf16p``: ``looplm`` with ``--bf16-prefill`` (prompts' products and attention in bfloat16
  on AMX tiles, decoding in float32; skipped where the CPU has no AMX tiles; ``--bf16-prefill``
  gives every looplm server the flag, as ``--kv-cache`` gives them its format);
- ``looplm-serial``: the same server with ``--max-batch 1`` (one request at a time);
- ``llama.cpp``: ``llama-cpp-python``'s OpenAI server on ``--gguf`` (the same model), where the
  package is installed (:mod:`looplm.bench.llama_server`; started again with llama.cpp's extra CPU
  buffer types off if it dies by a signal, as its AMX path does in some virtual machines).

Per server and concurrency: requests/s and generated tokens/s (completed requests and their
tokens over the level's wall time), steady tokens/s (text chunks streamed while all ``c``
workers had a request in flight, over that window: from the last first chunk of the ``c``
requests that open the level to the first worker that finds no request left, so the opening
burst of ``c`` prompts and the drain are left out; :func:`steady_rate`), time to first token
p50/p99 (request sent to first text), inter-token latency p50/p99 (gaps between streamed text
chunks), errors. looplm servers are
asked to ignore the end-of-text token (``ignore_eos``) so every request generates ``--max-tokens``;
token counts come from each stream's ``usage`` (looplm) or its chunks (llama.cpp, one token
each).

Decoding-state memory of ``--state-streams`` requests of ``--state-tokens`` tokens each, for an
attention, a gated DeltaNet and a hybrid (every 4th layer attention) model of the checkpoint's
width and layer count: one layer of each kind is prefilled with ``--state-tokens`` tokens in one
row and its state's ``nbytes()`` measured (rows and layers are independent, so the totals are
sums of these).

The engine without HTTP (``--engine-rows``, in this process, first): the serving engine's
aggregate greedy decode tokens/s (tokens of its decoding steps over their seconds, read from its
metrics) with that many requests of ``--engine-prompt`` tokens decoding ``--engine-tokens``
tokens together, on the checkpoint's weights in float32 and int4 (groups of 32, embedding and
head too), beside transformers' batched ``generate`` of the same rows on the same weights
(decode time = the time of N + 1 new tokens minus that of 1), where the checkpoint is a plain
Llama-shaped model. Ratios printed: engine / transformers at each row count, int4 / float32.
``--engine-only`` runs this table alone (no servers, no state-memory table; minutes).

Each level stops starting requests after ``--level-seconds`` and stops waiting for those in
flight after twice that (they are reported as ``cut``, apart from errors), so a run's length is
bounded. Writes ``serve.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch

from looplm.argtypes import positive_int
from looplm.bench.common import machine_info, markdown_table, parse_int_list, time_interleaved, write_json
from looplm.bench.infer import hf_generate, llama_twin, looplm_models
from looplm.bench.runner import log_axes, save_figure, subplots
from looplm.checkpoint import load_config, load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import LoopLMError
from looplm.model import LoopConfig, LoopLM
from looplm.ops.linear import BF16_NEEDS
from looplm.ops.qlinear import bf16_rows
from looplm.quant.ptq import quantize_model
from looplm.quantize_command import write_copy
from looplm.serve.engine import Engine, SamplingParams
from looplm.serve.metrics import parse_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the looplm checkpoint to serve")
    parser.add_argument("--gguf", default=None, help="the same model as GGUF, for llama-cpp-python's server")
    parser.add_argument("--concurrency", default="1,4,16,64", help="concurrent streams per level")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 2c, >= 8)")
    parser.add_argument("--level-seconds", type=float, default=30.0,
                        help="stop starting requests of a level after this long")
    parser.add_argument("--prompt-tokens", default="32,128,256", help="prompt lengths, used in turn")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="tokens generated per request (default 128, as vLLM's benchmark_serving)")
    parser.add_argument("--servers", default="looplm,looplm-bf16p,looplm-int4,looplm-serial,llama.cpp",
                        help="which servers to load (those not available are skipped)")
    parser.add_argument("--int4-checkpoint", default=None,
                        help="the int4 checkpoint looplm-int4 serves (default: the checkpoint quantised "
                        "for the run, int4 in groups of 32, embedding and head too)")
    parser.add_argument("--max-stall", type=float, default=None,
                        help="looplm servers' --max-stall (default: the server's)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="looplm servers' --prefill-chunk (default: the server's)")
    parser.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                        help="looplm servers' --kv-cache (attention caches in float or int8; default float)")
    parser.add_argument("--bf16-prefill", action="store_true",
                        help="every looplm server with --bf16-prefill (prompts' products and attention in "
                        "bfloat16 on AMX tiles; looplm-bf16p has it anyway)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads of each server (default: all)")
    parser.add_argument("--state-streams", type=int, default=64,
                        help="streams of the state-memory table (0: no table)")
    parser.add_argument("--state-tokens", type=int, default=4096, help="tokens per stream of that table")
    parser.add_argument("--engine-rows", default="16,64", help="rows of the engine table ('' : none)")
    parser.add_argument("--engine-prompt", type=int, default=64, help="prompt tokens of the engine table")
    parser.add_argument("--engine-tokens", type=int, default=32, help="new tokens of the engine table")
    parser.add_argument("--engine-only", action="store_true",
                        help="only the engine table: no servers, no state-memory table")
    parser.add_argument("--plot", default=None,
                        help="also write the load figure here (it is always written to OUT/serve.png)")
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


SERVERS = ("looplm", "looplm-bf16p", "looplm-int4", "looplm-serial", "llama.cpp")


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


def _looplm(name: str, ckpt: str, max_batch: int, threads: int | None, max_stall: float | None,
            prefill_chunk: int | None = None, kv_cache: str = "float", bf16_prefill: bool = False) -> Server:
    cmd = [sys.executable, "-m", "looplm.cli", "serve", ckpt, "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", "4096", *(["--bf16-prefill"] if bf16_prefill else [])]
    if threads:
        cmd += ["--threads", str(threads)]
    if max_stall is not None:
        cmd += ["--max-stall", str(max_stall)]
    if prefill_chunk is not None:
        cmd += ["--prefill-chunk", str(prefill_chunk)]
    if kv_cache != "float":
        cmd += ["--kv-cache", kv_cache]
    return Server(name, cmd, None, {"ignore_eos": True, "stream_options": {"include_usage": True}})


def _llama_cpp(gguf: str, threads: int | None, extra_bufts: bool = True) -> Server:
    """llama-cpp-python's server on ``gguf`` (:mod:`looplm.bench.llama_server`), llama.cpp's extra
    CPU buffer types (AMX, repacked weights) on or off."""
    port = _free_port()
    cmd = [sys.executable, "-m", "looplm.bench.llama_server", "--model", gguf, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", *(() if extra_bufts else ("--no-extra-bufts",))]
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return Server("llama.cpp", cmd, port, {})


def _started(start: Any, texts: list[str], seconds: float) -> tuple[Server | None, str]:
    """``start()``'s server after one warm-up request (first-call costs), or None and why not."""
    try:
        server = start()
    except LoopLMError as err:
        return None, str(err)
    warm = _run(_level(server, 1, 1, seconds, texts[:1], 2))
    if not warm["errors"]:
        return server, ""
    code = server.proc.poll()
    server.close()
    return None, f"its first request failed: {warm['error_examples'][0]}" + (
        "" if code is None else f" (the process exited with status {code})")


def int4_copy(checkpoint: str, out: Path) -> str:
    """``checkpoint`` quantised to int4 in groups of 32 (every linear, the embedding and the head,
    as the engine table's int4 model) and written to ``out``; its path."""
    model = load_model(checkpoint)
    if getattr(model, "quantization", None) is not None:
        raise LoopLMError(f"{checkpoint} is already quantised (give --int4-checkpoint)")
    quantize_model(model, "int4", group_size=32, keep_embeddings=False, keep_head=False)
    write_copy(model, Path(checkpoint), out)
    return str(out)


def _start(name: str, args: argparse.Namespace, levels: list[int], texts: list[str], seconds: float,
           scratch: Path) -> tuple[Server | None, str]:
    """The server ``name`` started and warmed up, or None and why it is skipped. llama.cpp's server
    is started again with its extra buffer types off if it dies by a signal (as AMX does in some
    virtual machines); looplm-int4's checkpoint is written into ``scratch`` unless given."""
    if name == "llama.cpp":
        if args.gguf is None:
            return None, "no --gguf given"
        if importlib.util.find_spec("llama_cpp") is None:
            return None, "llama-cpp-python is not installed"
        server, why = _started(partial(_llama_cpp, args.gguf, args.threads), texts, seconds)
        if server is None and "status -" in why:
            print(f"llama.cpp: {why}; again with its extra buffer types off", flush=True)
            server, why = _started(partial(_llama_cpp, args.gguf, args.threads, False), texts, seconds)
        return server, why
    bf16 = args.bf16_prefill or name == "looplm-bf16p"
    if bf16 and not bf16_rows():
        return None, f"--bf16-prefill needs {BF16_NEEDS}"
    if name in ("looplm", "looplm-serial", "looplm-int4", "looplm-bf16p"):
        batch = 1 if name == "looplm-serial" else max(levels)
        ckpt = args.checkpoint
        if name == "looplm-int4":
            try:
                ckpt = args.int4_checkpoint or int4_copy(args.checkpoint, scratch / "int4")
            except LoopLMError as err:
                return None, str(err)
        return _started(partial(_looplm, name, ckpt, batch, args.threads, args.max_stall, args.prefill_chunk,
                                args.kv_cache, bf16),
                        texts, seconds)
    raise LoopLMError(f"unknown server {name!r} in --servers ({', '.join(SERVERS)})")


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
    stamps: list[float] = []  # when each text chunk arrived
    used = None
    stream = await client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True, extra_body=server.extra)
    async for ch in stream:
        if getattr(ch, "usage", None) is not None:
            used = ch.usage.completion_tokens
        if ch.choices and ch.choices[0].text:
            stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else None, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": used or len(stamps), "prompt": prompt, "stamps": stamps}


def steady_rate(results: list[dict[str, Any]], drained: list[float]) -> float | None:
    """Streamed text chunks per second while every worker of a level had a request in flight: from
    the last first chunk of the requests that opened the level (``initial``) to the first time a
    worker found no request left to start (``drained``), so the opening burst of prompts and the
    drain at the end are left out; None when that window is empty. ``results``: ``_one``'s, with
    ``initial`` set."""
    firsts = [r["stamps"][0] for r in results if r.get("initial") and r["stamps"]]
    if not firsts or not drained:
        return None
    t0, t1 = max(firsts), min(drained)
    if t1 <= t0:
        return None
    return sum(t0 < t <= t1 for r in results for t in r["stamps"]) / (t1 - t0)


async def _level(server: Server, c: int, n: int, seconds: float, texts: list[str], max_tokens: int
                 ) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600,
                         http_client=None)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    counter = iter(range(n))
    start = time.perf_counter()

    drained: list[float] = []  # when each worker stopped starting requests

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() - start > seconds:
                break
            try:
                results.append({**await _one(client, server, texts[i % len(texts)], max_tokens),
                                "initial": i < c})
            except Exception as err:  # counted and reported, the load goes on
                errors.append(f"{type(err).__name__}: {err}")
        drained.append(time.perf_counter())

    tasks = [asyncio.ensure_future(worker()) for _ in range(c)]
    _, late = await asyncio.wait(tasks, timeout=2 * seconds)
    for task in late:  # requests still in flight at twice the level's time: not waited for
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    longest = max(texts, key=len)
    ttft_long = [r["ttft"] for r in results if r["ttft"] is not None and r["prompt"] == longest]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"server": server.name, "concurrency": c, "requests": len(results), "errors": len(errors),
            "cut": len(late), "ttft_longest_p50": _pct(ttft_long, 50),
            "ttft_longest_p99": _pct(ttft_long, 99),
            "error_examples": errors[:3], "seconds": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "generated_tokens": tokens,
            "steady_tokens_per_s": steady_rate(results, drained),
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


def engine_decode(model: LoopLM, tokenizer: Any, prompts: list[list[int]], new_tokens: int,
                  kv_cache: str | None = None) -> float:
    """Aggregate greedy decode tokens/s of the serving engine when ``prompts`` are served together
    (read in one prefill iteration, then every decoding step has all rows): the tokens of its
    decoding steps over their seconds, from its metrics. The engine runs in this thread."""
    eng = Engine(model, tokenizer, max_batch=len(prompts), max_queue=len(prompts),
                 prefill_chunk=sum(len(p) for p in prompts), kv_cache=kv_cache)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for p in prompts:
        eng.submit(p, params, lambda ev: None)
    eng.run_until_idle()  # in this thread, as transformers' rows run (see Engine.run_until_idle)
    m = parse_metrics(eng.metrics.render().decode())
    return m["looplm_batch_size_sum"] / m["looplm_step_seconds_sum"]


def engine_table(checkpoint: str, rows: list[int], prompt_len: int, new_tokens: int) -> list[dict[str, Any]]:
    """The engine's decode tokens/s at each row count, float32, int4 and int4 with int8 caches, and
    transformers' batched ``generate`` on the same weights (skipped with the reason when it cannot
    hold them)."""
    base = load_model(checkpoint).float().eval()
    tokenizer = load_tokenizer(checkpoint)
    models: dict[str, Any] = looplm_models(base, ["float32", "int4"], group_size=32)
    models["looplm_int4_kv8"] = models["looplm_int4"]  # the same model, its caches held in int8
    c = base.config
    if not (c.mixer == "attention" and c.n_recursions == 1 and c.n_prelude == c.n_coda == 0
            and c.ffn == "dense" and c.tie_embeddings and not c.qkv_bias and c.rope_scaling is None):
        print("engine: no transformers row (the checkpoint is not a plain tied Llama-shaped model)")
    elif importlib.util.find_spec("transformers") is None:
        print("engine: no transformers row (transformers is not installed)")
    else:
        models["transformers_float32"] = llama_twin(base)
    vocab = base.config.vocab_size
    out = []
    for n in rows:
        ids = torch.randint(0, vocab, (n, prompt_len), generator=torch.Generator().manual_seed(n))
        for name, m in models.items():
            if name.startswith("looplm"):
                kv = "int8" if name.endswith("_kv8") else None
                engine_decode(m, tokenizer, ids[:, :4].tolist(), 2, kv)  # warm-up (threads, allocator)
                tok_s = engine_decode(m, tokenizer, ids.tolist(), new_tokens, kv)
            else:
                secs = time_interleaved({"1": partial(hf_generate, m, ids, 1),
                                         "n": partial(hf_generate, m, ids, new_tokens + 1)},
                                        repeats=2)
                tok_s = n * new_tokens / (secs["n"] - secs["1"])
            out.append({"model": name, "rows": n, "decode_tok_s": tok_s})
            print(f"engine {name:22s} rows={n:3d}: {tok_s:.1f} decode tok/s", flush=True)
    return out


def _engine_report(rows: list[dict[str, Any]]) -> str:
    by = {(r["model"], r["rows"]): r["decode_tok_s"] for r in rows}
    table = []
    for r in rows:
        ref = by.get(("transformers_float32", r["rows"]))
        f32 = by.get(("looplm_float32", r["rows"]))
        tok_s = r["decode_tok_s"]
        table.append([r["model"], r["rows"], tok_s, None if ref is None else tok_s / ref,
                      None if f32 is None else tok_s / f32])
    text = markdown_table(["model", "rows", "decode tok/s", "x transformers", "x looplm float32"], table)
    print(text)
    return text


def _run(level: Any) -> Any:
    """The load generator's coroutine run on uvloop where installed (it shares the cores with the
    servers, and uvloop's loop spends less of them per streamed chunk), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(level)
    return uvloop.run(level)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def _drive(server: Server, levels: list[int], args: argparse.Namespace, seconds: float, texts: list[str],
           max_tokens: int, rows: list[dict[str, Any]]) -> str:
    """Each load level against ``server``, its rows appended to ``rows``; why it stopped early
    (the process died) or ""."""
    for c in levels:
        n = args.requests or (c if args.quick else max(8, 2 * c))
        row = _run(_level(server, c, n, seconds, texts, max_tokens))
        rows.append(row)
        print(f"{server.name:14s} c={c:3d}: {row['requests']} requests, {row['tokens_per_s']:.1f} tok/s, "
              f"{row['errors']} errors", flush=True)
        if server.proc.poll() is not None:  # it crashed: the remaining levels would only fail
            return f"the server process exited with status {server.proc.returncode} at c={c}"
    return ""


def run(args: argparse.Namespace) -> int:
    levels = parse_int_list(args.concurrency, "--concurrency")
    lengths = parse_int_list(args.prompt_tokens, "--prompt-tokens")
    max_tokens, seconds = args.max_tokens, args.level_seconds
    if args.quick:
        levels, lengths, max_tokens, seconds = levels[:2] if len(levels) > 1 else levels, lengths[:2], 4, 20.0
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in wanted:
        if name not in SERVERS:
            raise LoopLMError(f"unknown server {name!r} in --servers ({', '.join(SERVERS)})")
    texts = prompts(args.checkpoint, lengths)
    began = time.perf_counter()
    engine_rows = parse_int_list(args.engine_rows, "--engine-rows") if args.engine_rows.strip() else []
    e_prompt, e_tokens = (8, 4) if args.quick else (args.engine_prompt, args.engine_tokens)
    if args.engine_only and not engine_rows:
        raise LoopLMError("--engine-only needs --engine-rows (the rows of the engine table)")
    threads = torch.get_num_threads()
    if args.threads:  # the engine table runs in this process
        torch.set_num_threads(args.threads)
    try:
        engine = engine_table(args.checkpoint, engine_rows, e_prompt, e_tokens) if engine_rows else []
    finally:
        torch.set_num_threads(threads)
    engine_text = _engine_report(engine) if engine else ""
    settings = {"checkpoint": args.checkpoint, "threads": args.threads, "engine_rows": engine_rows,
                "engine_prompt": e_prompt, "engine_tokens": e_tokens}
    if args.engine_only:
        write_json(args.out, "serve", {"settings": settings, "machine": machine_info(), "engine": engine,
                                       "seconds": time.perf_counter() - began,
                                       "table": "Engine decode:\n\n" + engine_text})
        return 0
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="looplm-bench-serve-") as scratch:
        for name in wanted:
            server, why = _start(name, args, levels, texts, seconds, Path(scratch))
            if server is None:
                skipped[name] = why
                continue
            try:
                crashed = _drive(server, levels, args, seconds, texts, max_tokens, rows)
            finally:
                server.close()
            if crashed:
                skipped[name] = crashed
    load_table = _report(rows, skipped, levels)
    if rows:
        for path in [Path(args.out) / "serve.png", *([Path(args.plot)] if args.plot else [])]:
            print(f"figure: {plot(rows, path)}")
    streams, tokens = (4, 256) if args.quick else (args.state_streams, args.state_tokens)
    memory = state_memory(load_config(args.checkpoint), streams, tokens) if streams > 0 else []
    memory_table = markdown_table(["model", "layers", "attention layers", "streams x tokens", "state MiB",
                                   "vs attention"],
                                  [[m["model"], m["layers"], m["attention_layers"], f"{streams} x {tokens}",
                                    m["bytes"] / 2**20, m["vs_attention"]] for m in memory]) if memory else ""
    if memory_table:
        print(memory_table)
    elapsed = time.perf_counter() - began
    print(f"bench serve took {elapsed:.0f} s")
    write_json(args.out, "serve", {"settings": {**settings, "levels": levels, "prompt_tokens": lengths,
                                                "max_tokens": max_tokens, "level_seconds": seconds,
                                                "gguf": args.gguf},
                                   "machine": machine_info(), "results": rows, "skipped": skipped,
                                   "state_memory": memory, "engine": engine, "seconds": elapsed,
                                   "table": load_table
                                   + ("\n\nDecoding-state memory:\n\n" + memory_table if memory_table else "")
                                   + ("\n\nEngine decode:\n\n" + engine_text if engine_text else "")})
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """The load levels against concurrency, one line per server: generated tokens/s, time to first
    token (p50 dashed, p99 solid) and inter-token latency p50 (log scales)."""
    fig, axes = subplots(3, 1, size=(4.4, 3.6))
    servers = list(dict.fromkeys(r["server"] for r in rows))
    for k, name in enumerate(servers):
        mine = sorted((r for r in rows if r["server"] == name), key=lambda r: r["concurrency"])
        conc = [r["concurrency"] for r in mine]
        color = f"C{k}"
        axes[0][0].plot(conc, [r["tokens_per_s"] for r in mine], marker="o", color=color, label=name)
        for key, style in (("ttft_p99", "-"), ("ttft_p50", "--")):
            pts = [(c, r[key]) for c, r in zip(conc, mine) if r[key] is not None]
            axes[0][1].plot([c for c, _ in pts], [v for _, v in pts], style, marker="o", color=color,
                            label=name if key == "ttft_p99" else None)
        pts = [(c, 1000 * r["itl_p50"]) for c, r in zip(conc, mine) if r["itl_p50"] is not None]
        axes[0][2].plot([c for c, _ in pts], [v for _, v in pts], marker="o", color=color, label=name)
    log_axes(axes[0], "concurrent streams",
             ("generated tokens/s", "time to first token (s; p99 solid, p50 dashed)",
              "inter-token latency p50 (ms)"),
             ("throughput", "first token", "streaming"), legend_size=7)
    return save_figure(fig, path)


def _report(rows: list[dict[str, Any]], skipped: dict[str, str], levels: list[int]) -> str:
    def ms(v: float | None) -> float | None:
        return None if v is None else 1000 * v

    table = [[r["server"], r["concurrency"], r["requests"], r["requests_per_s"], r["tokens_per_s"],
              r["steady_tokens_per_s"], ms(r["ttft_p50"]), ms(r["ttft_p99"]), ms(r["ttft_longest_p99"]),
              ms(r["itl_p50"]), ms(r["itl_p99"]), r["errors"], r["cut"]]
             for r in rows]
    text = markdown_table(["server", "conc.", "requests", "req/s", "gen tok/s", "steady tok/s", "TTFT p50 ms",
                           "TTFT p99 ms", "TTFT p99 ms (longest prompts)", "ITL p50 ms", "ITL p99 ms",
                           "errors", "cut"], table)
    print(text)
    by = {(r["server"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    steady = {(r["server"], r["concurrency"]): r["steady_tokens_per_s"] for r in rows}
    lo, hi = min(levels), max(c for c in levels if c <= 16) if any(c <= 16 for c in levels) else None
    for name in ("looplm", "looplm-bf16p", "looplm-int4"):
        if hi and (name, lo) in by and (name, hi) in by and hi != lo:
            a, b = steady[name, hi], steady[name, lo]
            print(f"{name}: tokens/s at concurrency {hi} / at {lo}: {by[name, hi] / by[name, lo]:.2f}x"
                  + (f" (steady: {a / b:.2f}x)" if a and b else ""))
        for c in levels:
            if (name, c) in by and ("llama.cpp", c) in by:
                print(f"concurrency {c}: {name} / llama.cpp tokens/s {by[name, c] / by['llama.cpp', c]:.2f}x")
    for c in levels:
        if ("looplm", c) in by and ("looplm-int4", c) in by:
            ratio = by["looplm-int4", c] / by["looplm", c]
            print(f"concurrency {c}: looplm-int4 / looplm tokens/s {ratio:.2f}x")
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    return text
