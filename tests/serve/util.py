"""Tiny models, an engine driver and a uvicorn server on a free loopback port for the serve tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import torch

from looplm.data.tokenizer import ByteTokenizer
from looplm.model import LoopConfig, LoopLM
from looplm.serve.engine import Engine, Event, SamplingParams

BASE = dict(vocab_size=259, d_model=64, n_heads=2, n_core=2, max_seq_len=256, init_std=0.1)
CONFIGS = {
    "attention": {},
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "hybrid": dict(mixer="gated_deltanet", attn_every=2),
    "mor": dict(n_prelude=1, n_core=1, n_coda=1, n_recursions=3, sharing="middle_cycle",
                router="expert_choice", selection="threshold"),
    "moe": dict(ffn="moe", n_experts=4, top_k=2, d_ffn=64),
    "liger": dict(mixer="liger_gla", window=4, attn_every=2),  # linearised, a window shorter than prompts
}


def tiny_model(name: str = "attention", seed: int = 0, **over) -> LoopLM:
    torch.manual_seed(seed)
    return LoopLM(LoopConfig(**{**BASE, **CONFIGS[name], **over})).eval()


def run_requests(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], timeout: float = 60
                 ) -> list[list[int]]:
    """Submit every job at once to a started engine; the generated ids of each."""
    done = threading.Semaphore(0)

    def emit(ev: Event) -> None:
        if ev.finish_reason is not None:
            done.release()

    reqs = [engine.submit(p, sp, emit) for p, sp in jobs]
    for _ in reqs:
        assert done.acquire(timeout=timeout), "a request did not finish in time"
    return [r.tokens for r in reqs]


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def tokenizer(eos: bool = True) -> ByteTokenizer:
    """The byte tokenizer; ``eos=False``: without an end-of-text id (requests run to max_tokens)."""
    tok = ByteTokenizer()
    if not eos:
        tok.eos_id = None
    return tok
