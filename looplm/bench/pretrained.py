"""``looplm bench pretrained``: a pretrained GGUF model run by transformers, llama.cpp and looplm,
side by side on the same file, tokens and threads.

Rows: transformers float32 on the dequantised weights (``from_pretrained(dir, gguf_file=...)``);
llama.cpp through ``llama-cpp-python`` on the original file (the optional ``looplm[bench]`` extra;
the row says "not installed" without it); looplm float32, bfloat16, int8 and int4 (``looplm
import --quantize`` of the file: every linear and, unless ``--keep-head``, the tied embedding/head
quantised; int4 in groups of 32 with the table in int8, as the file's Q4_1 + Q8_0, whose codes they
keep where the formats are the same; int8 in groups of ``--int8-group-size``, the table in groups of
``--head-group-size``); the ``-kv8`` rows decode the same int8/int4 checkpoints with the KV cache held
as int8 codes with a float32 scale per cached row and head (``iter_tokens(state_format="int8")``,
:mod:`looplm.quant.state`; llama.cpp holds its cache in float16 by default), and score the texts
through such a cache (every key and value of a window read back from its int8 codes, as decoding
reads them). Each row runs in its own subprocess so its peak RSS is its own.

Figures per row, all on the same token ids (the looplm import's tokenizer):
- decode tokens/s after a 32- and a 1024-token prompt (greedy, 128 new tokens; the first new
  token comes from the prefill, the other 127 are timed), and prefill tokens/s of those prompts;
- perplexity and bits per byte on two held-out texts present on every Debian/Ubuntu + Python
  install: English prose, ``/usr/share/common-licenses/GPL-3`` (the GPL version 3), and Python
  source, the running interpreter's ``pprint.py`` (a file of the validation split of looplm's
  stdlib corpus, so no looplm run trained on it); the first ``--eval-tokens`` tokens of each, in
  non-overlapping windows of ``--window`` tokens (:mod:`looplm.perplexity`);
- prefill GFLOP/s: the useful work of a prefill of T tokens (every linear of every layer per token,
  causal attention's T(T+1)/2 score and value products, the head once: :func:`prefill_flops`, the
  same count for every row) over its time, against the float32 matrix-product rate measured in
  the same run (``torch.mm`` of a prefill-shaped ``[1024, d] x [d, F]``: the machine's fused
  multiply-add peak as a well-tuned BLAS reaches it);
- peak RSS growth: the subprocess's resident high-water mark over loading, prefills and decoding
  (before the texts are scored) minus its resident size once the interpreter, torch and this module
  are imported, i.e. what the row's library, weights, caches and work add (both are in the JSON),
  and its ratio to the issue's budget for it, 1.5x the weights read per token plus the KV cache of
  the longest prompt and its new tokens;
- bytes read per decoded token: the weights a step reads (tied embedding/head once; an untied
  embedding only by its row) plus the KV cache at the mean context, and the GB/s that implies
  against the memory bandwidth measured in the same run (a torch sum over 1 GB of float32).
Ratios against llama.cpp and transformers are printed. Writes ``pretrained.json`` and
``pretrained.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from looplm.argtypes import positive_int
from looplm.bench.common import machine_info, markdown_table, write_json
from looplm.bench.runner import save_figure, subplots
from looplm.checkpoint import load_config, load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import LoopLMError
from looplm.generate import iter_tokens
from looplm.perplexity import score_tokens, scored_bytes, windows
from looplm.pretrained.convert import import_checkpoint
from looplm.pretrained.pull import cached_model_path
from looplm.quant.state import quantize_caches

ROWS = ("transformers-float32", "llama.cpp", "looplm-float32", "looplm-bfloat16", "looplm-int8",
        "looplm-int4", "looplm-int8-kv8", "looplm-int4-kv8")
PROSE = Path("/usr/share/common-licenses/GPL-3")


def code_text() -> Path:
    """The interpreter's ``pprint.py``: Python source in the validation split of the stdlib corpus."""
    return Path(sysconfig.get_paths()["stdlib"]) / "pprint.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="a model `looplm pull` knows (default smollm2)")
    parser.add_argument("--gguf", default=None, help="a GGUF file instead of --model")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads of every row (default: torch's)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 1024], help="prompt lengths (tokens)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens decoded after each prompt")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each held-out text scored")
    parser.add_argument("--window", type=int, default=1024, help="evaluation window (tokens)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per prompt length (the fastest counts)")
    parser.add_argument("--keep-head", action="store_true",
                        help="int8/int4 rows: keep the tied embedding/head in float32")
    parser.add_argument("--int8-group-size", type=int, default=INT8_BODY_GROUP, metavar="G",
                        help=f"int8 row: inputs per scale of every linear (default {INT8_BODY_GROUP}; "
                             "0: one per row)")
    parser.add_argument("--head-group-size", type=int, default=HEAD_GROUP, metavar="G",
                        help=f"int8 and int4 rows: inputs per scale of the int8 tied embedding/head (default "
                             f"{HEAD_GROUP}; 0: one per row)")
    parser.add_argument("--prose", default=str(PROSE), help="English prose text (default: the GPL-3 text)")
    parser.add_argument("--code", default=None, help="Python source text (default: the stdlib's pprint.py)")
    parser.add_argument("--out", default="bench_results/pretrained")
    parser.add_argument("--plot", default=None,
                        help="also save the figure here (e.g. docs/figures/pretrained.png)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (tests; give --gguf)")


# ---------------------------------------------------------------- parent: preparation


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(prompts=sorted(args.prompts), new_tokens=args.new_tokens, eval_tokens=args.eval_tokens,
             window=args.window, repeats=args.repeats, rows=list(args.rows), keep_head=args.keep_head,
             int8_group=args.int8_group_size or None, head_group=args.head_group_size or None,
             threads=args.threads or torch.get_num_threads(), bandwidth_bytes=1 << 30)
    if args.quick:
        s.update(prompts=[8, 24], new_tokens=4, eval_tokens=96, window=32, repeats=1, bandwidth_bytes=1 << 26)
    if (min(s["prompts"]) < 1 or s["new_tokens"] < 2 or s["eval_tokens"] < 2 or s["window"] < 1
            or s["repeats"] < 1):
        raise LoopLMError("--prompts, --eval-tokens, --window and --repeats must be positive, "
                          "--new-tokens >= 2")
    return s


def model_file(args: argparse.Namespace) -> Path:
    path = Path(args.gguf) if args.gguf else cached_model_path(args.model)
    if not path.is_file():
        how = "check --gguf" if args.gguf else f"run `looplm pull {args.model}` first"
        raise LoopLMError(f"model file {path} does not exist: {how}")
    return path


# int4 rows: groups of 32 inputs with a scale and an offset each, as the file's own Q4_1 (whose codes
# they keep), and the tied embedding/head in int8, as the file keeps it in Q8_0.
INT4_GROUP = 32
# int8 rows: one scale per INT8_BODY_GROUP inputs; the int8 table of both rows: per HEAD_GROUP inputs, the
# file's own Q8_0 codes (None: one scale per row). Chosen by perplexity on the held-out texts: per row
# the int8 row lost 0.70% on prose; g64 with the g32 table 0.00% / 0.17% (docs/results.md).
INT8_BODY_GROUP: int | None = 64
HEAD_GROUP: int | None = 32


def prepare_checkpoints(gguf: Path, work: Path, rows: list[str], keep_head: bool,
                        int8_group: int | None = INT8_BODY_GROUP,
                        head_group: int | None = HEAD_GROUP) -> dict[str, Path]:
    """The float32 import of ``gguf`` and its int8/int4 copies under ``work`` (made once: the
    directory name carries the file's size and mtime and the formats' group sizes)."""
    st = gguf.stat()
    base = work / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"
    ckpts = {"float32": base / "float32"}
    if not ckpts["float32"].is_dir():
        import_checkpoint(gguf, ckpts["float32"])
    for fmt in ("int8", "int4"):
        if not any(r == f"looplm-{fmt}" or r.startswith(f"looplm-{fmt}-") for r in rows):
            continue
        group = INT4_GROUP if fmt == "int4" else int8_group
        head = "-keephead" if keep_head else f"-head8g{head_group or 'row'}"
        path = base / f"{fmt}-g{group or 'row'}{head}"
        if not path.is_dir():  # matrices in the file's own format keep its codes (int4 g32, int8 g32)
            import_checkpoint(gguf, path, quantize=fmt, quantize_options=dict(
                group_size=group, keep_embeddings=keep_head, keep_head=keep_head, embedding_format="int8",
                embedding_group_size=head_group))
        ckpts[fmt] = path
    return ckpts


def read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise LoopLMError(f"cannot read the {what} text {path} ({err.strerror}); "
                          f"give another with --{what}") from None


def prefill_flops(config: Any, tokens: int) -> float:
    """FLOPs a prefill of ``tokens`` needs: 2 per weight of every layer's linears per token, the
    causal attention's scores and weighted values (4 H D per visible pair), the head at the last
    token (a tied or untied table of ``vocab x d``)."""
    c = config
    D = c.head_dim or c.d_model // c.n_heads
    layers = c.n_prelude + c.n_core * c.n_recursions + c.n_coda
    d, H = c.d_model, c.n_heads
    per_layer = d * (H + 2 * c.kv_heads) * D + H * D * d + 3 * d * c.ffn_dim
    pairs = tokens * (tokens + 1) // 2
    return 2.0 * tokens * layers * per_layer + 4.0 * layers * H * D * pairs + 2.0 * c.vocab_size * d


def matmul_gflops(d: int, f: int, rows: int = 1024, repeats: int = 7) -> float:
    """GFLOP/s of a float32 ``torch.mm`` of ``[rows, d] x [d, f]`` (median of ``repeats`` after a warm-up)."""
    a, b = torch.randn(rows, d), torch.randn(d, f)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2.0 * rows * d * f / sorted(times)[len(times) // 2] / 1e9


def memory_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """GB/s of a torch sum over ``nbytes`` of float32 (median of ``repeats`` after one warm-up)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def run_row(row: str, job_path: Path, threads: int, *flags: str) -> dict[str, Any]:
    """One row in its own interpreter; its last stdout line is the row's JSON. A llama.cpp row
    killed by a signal is run again with llama.cpp's extra buffer types off (see ``_llama``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "looplm.bench.pretrained", row, str(job_path), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode < 0 and row == "llama.cpp" and not flags:
        return run_row(row, job_path, threads, "--no-extra-bufts")
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"row": row, "status": f"failed: {tail}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- child: one row


class Backend:
    """What a row measures: ``generate`` (prefill, then greedy steps) and ``nll`` of targets."""

    weight_bytes: int  # read per decoded token
    kv_bytes_per_token: int  # cache bytes one context token adds

    def generate(self, prompt: list[int], n_new: int) -> tuple[float, float, list[int]]:
        """(prefill seconds incl. the first token, seconds of the other ``n_new - 1``, tokens)."""
        raise NotImplementedError

    def window_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits ``[len(ids), V]`` of one window."""
        raise NotImplementedError

    def nll(self, ids: list[int], window: int) -> float:
        """Summed NLL of ``ids[1:]`` in non-overlapping windows."""
        total = 0.0
        for w in windows(len(ids), window):
            logits = self.window_logits(ids[w.start:w.end])[-w.scored:].float()
            target = torch.tensor(ids[w.end - w.scored + 1:w.end + 1])
            total += F.cross_entropy(logits, target, reduction="sum").item()
        return total


def _kv_per_token(n_layers: int, n_kv_heads: int, head_dim: int, elt: int) -> int:
    return 2 * n_layers * n_kv_heads * head_dim * elt


def _unique_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class LoopBackend(Backend):
    """A looplm checkpoint in ``dtype``; ``cache``: the KV cache's format (None: the model's dtype)."""

    def __init__(self, ckpt: Path, dtype: torch.dtype, cache: str | None = None) -> None:
        self.model = load_model(ckpt).eval()
        self.cache = cache
        if dtype != torch.float32:
            self.model.to(dtype)
        c = self.model.config
        tensors = list(self.model.state_dict().values())
        embed = [t for k, t in self.model.state_dict().items() if k.startswith("embed.")]
        self.weight_bytes = _unique_bytes(tensors) - (0 if c.tie_embeddings else _unique_bytes(embed))
        head_dim = getattr(c, "head_dim", None) or c.d_model // c.n_heads
        n_layers = c.n_prelude + c.n_core * c.n_recursions + c.n_coda
        n_kv = getattr(c, "n_kv_heads", None) or c.n_heads
        self.kv_bytes_per_token = _kv_per_token(n_layers, n_kv, head_dim, 2 if dtype == torch.bfloat16 else 4)
        if cache is not None:  # one byte per element and a float32 scale per cached row and head
            self.kv_bytes_per_token = _kv_per_token(n_layers, n_kv, head_dim + 4, 1)

    def generate(self, prompt, n_new):
        start = time.perf_counter()
        it = iter_tokens(self.model, [prompt], max_new_tokens=n_new, state_format=self.cache)
        out = [int(next(it))]
        first = time.perf_counter()
        out += [int(t) for t in it]
        return first - start, time.perf_counter() - first, out

    def window_logits(self, ids):
        """Through a cache in ``self.cache``: every key and value read back from its codes."""
        state = quantize_caches(self.model.init_state(1), self.cache)
        with torch.no_grad():
            return self.model(torch.tensor([ids]), state=state, use_cache=True).logits[0]

    def nll(self, ids, window):
        if self.cache is not None:
            return super().nll(ids, window)
        return score_tokens(self.model, torch.tensor(ids), window=window).nll


class TransformersBackend(Backend):
    def __init__(self, gguf: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32).eval()
        c = self.model.config
        self.weight_bytes = _unique_bytes(self.model.parameters())
        if not c.tie_word_embeddings:
            self.weight_bytes -= _unique_bytes([self.model.get_input_embeddings().weight])
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.kv_bytes_per_token = _kv_per_token(c.num_hidden_layers, c.num_key_value_heads, head_dim, 4)

    @torch.inference_mode()
    def generate(self, prompt, n_new):
        start = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(n_new - 1):
            out = self.model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        return first - start, time.perf_counter() - first, tokens

    @torch.inference_mode()
    def window_logits(self, ids):
        return self.model(input_ids=torch.tensor([ids])).logits[0]


@contextlib.contextmanager
def llama_extra_bufts(on: bool) -> Iterator[None]:
    """Inside, ``llama_cpp`` loads models with llama.cpp's extra CPU buffer types (AMX and repacked
    weights) ``on`` or off: they crash in some virtual machines whose CPUs report AMX."""
    import llama_cpp.llama as api

    defaults = api.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = on
        return p

    api.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_cpp.llama_model_default_params = defaults


def _llama(path: Path, extra_bufts: bool, **kwargs: Any) -> Any:
    """A ``llama_cpp.Llama`` (extra buffer types as :func:`llama_extra_bufts` sets them)."""
    import llama_cpp

    with llama_extra_bufts(extra_bufts):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


class LlamaCppBackend(Backend):
    def __init__(self, gguf: Path, threads: int, n_ctx: int, extra_bufts: bool) -> None:
        import gguf as gguf_lib

        self.path, self.threads, self.n_ctx, self.extra_bufts = gguf, threads, n_ctx, extra_bufts
        self.llm = _llama(gguf, extra_bufts, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=False)
        reader = gguf_lib.GGUFReader(str(gguf))
        sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
        tied = "output.weight" not in sizes
        self.weight_bytes = sum(sizes.values()) - (0 if tied else sizes.get("token_embd.weight", 0))
        self.file_type = _gguf_file_type(reader)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        n_layers = _gguf_int(reader, f"{arch}.block_count")
        n_heads = _gguf_int(reader, f"{arch}.attention.head_count")
        n_kv = _gguf_int(reader, f"{arch}.attention.head_count_kv") or n_heads
        width = _gguf_int(reader, f"{arch}.embedding_length")
        self.kv_bytes_per_token = _kv_per_token(n_layers, n_kv, width // n_heads, 2)  # f16 cache
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))

    def generate(self, prompt, n_new):
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        token = int(self._last_logits().argmax())
        tokens = [token]
        first = time.perf_counter()
        for _ in range(n_new - 1):
            self.llm.eval([token])
            token = int(self._last_logits().argmax())
            tokens.append(token)
        return first - start, time.perf_counter() - first, tokens

    def nll(self, ids, window):
        self.llm = None  # the scoring context keeps every position's logits: load it alone
        llm = _llama(self.path, self.extra_bufts, n_ctx=max(window, 8), n_batch=max(window, 8),
                     n_threads=self.threads, n_threads_batch=self.threads, logits_all=True)
        total = 0.0
        for w in windows(len(ids), window):
            llm.reset()
            llm.eval(ids[w.start:w.end])
            logits = torch.from_numpy(np.array(llm.scores[:w.end - w.start]))[-w.scored:]
            target = torch.tensor(ids[w.end - w.scored + 1:w.end + 1])
            total += F.cross_entropy(logits.float(), target, reduction="sum").item()
        return total


def _gguf_int(reader: Any, key: str) -> int:
    field = reader.fields.get(key)
    return 0 if field is None else int(field.parts[-1][0])


def _gguf_file_type(reader: Any) -> str:
    """The name of the file's most common matrix type (e.g. ``Q4_1``)."""
    kinds = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return kinds.most_common(1)[0][0] if kinds else "?"


def _rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float | None:
    """The process's resident high-water mark (``VmHWM``: unlike ``ru_maxrss`` it does not carry
    the parent's peak over ``exec``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def measure(row: str, job: dict[str, Any]) -> dict[str, Any]:
    """Load the row's backend, time prefill and decoding at each prompt length, score the texts."""
    torch.set_num_threads(job["threads"])
    base_rss = _rss_mb()
    gguf = Path(job["gguf"])
    start = time.perf_counter()
    if row == "transformers-float32":
        backend: Backend = TransformersBackend(gguf)
    elif row == "llama.cpp":
        try:
            backend = LlamaCppBackend(gguf, job["threads"], max(job["prompts"]) + job["new_tokens"] + 8,
                                      job.get("extra_bufts", True))
        except ImportError:
            return {"row": row, "status": "not installed (pip install 'looplm[bench]')"}
    else:
        kind, *cache = row.split("-")[1:]
        ckpt = Path(job["ckpts"]["float32" if kind == "bfloat16" else kind])
        backend = LoopBackend(ckpt, torch.bfloat16 if kind == "bfloat16" else torch.float32,
                              "int8" if cache == ["kv8"] else None)
    load_s = time.perf_counter() - start
    prompt_ids = job["prompt_ids"]
    backend.generate(prompt_ids[:8], 3)  # warm-up: thread pools, allocator, lazy paths
    points = []
    for n in job["prompts"]:
        runs = [backend.generate(prompt_ids[:n], job["new_tokens"]) for _ in range(job["repeats"])]
        prefill_s = min(r[0] for r in runs)
        decode_s = min(r[1] for r in runs)
        decode_tps = (job["new_tokens"] - 1) / decode_s
        kv = backend.kv_bytes_per_token * (n + job["new_tokens"] / 2)
        bytes_per_token = backend.weight_bytes + kv
        points.append({"prompt": n, "prefill_tokens_per_s": n / prefill_s, "decode_tokens_per_s": decode_tps,
                       "bytes_per_token": bytes_per_token,
                       "implied_gb_per_s": bytes_per_token * decode_tps / 1e9, "tokens": runs[0][2]})
    peak = _peak_rss_mb()
    cache = backend.kv_bytes_per_token * (max(job["prompts"]) + job["new_tokens"])
    quality = {}
    for name, text in job["texts"].items():
        nll = backend.nll(text["ids"], job["window"])
        n = len(text["ids"]) - 1
        quality[name] = {"tokens": n, "bytes": text["bytes"], "perplexity": math.exp(nll / n),
                         "bits_per_byte": nll / math.log(2) / text["bytes"]}
    out = {"row": row, "status": "ok", "load_s": load_s, "weight_bytes": backend.weight_bytes,
           "kv_bytes_per_token": backend.kv_bytes_per_token, "peak_rss_mb": peak, "start_rss_mb": base_rss,
           "rss_growth_mb": None if peak is None or base_rss is None else peak - base_rss,
           "rss_budget_mb": (1.5 * backend.weight_bytes + cache) / 2**20,
           "points": points, "quality": quality}
    if isinstance(backend, LlamaCppBackend):
        out.update(file_type=backend.file_type, extra_bufts=backend.extra_bufts)
    return out


# ---------------------------------------------------------------- parent: report


def ratios(results: dict[str, Any]) -> None:
    """Add, per row and prompt length, decode ratios against llama.cpp and transformers and the
    prefill ratio against transformers; per text, perplexity change against looplm float32."""
    def point(row: str, n: int) -> dict[str, Any] | None:
        r = results.get(row)
        if not r or r.get("status") != "ok":
            return None
        return next((p for p in r["points"] if p["prompt"] == n), None)

    ref_q = results.get("looplm-float32", {}).get("quality")
    for r in results.values():
        if r.get("status") != "ok":
            continue
        for p in r["points"]:
            for ref, key in (("llama.cpp", "vs_llama_cpp"), ("transformers-float32", "vs_transformers")):
                q = point(ref, p["prompt"])
                p[f"decode_{key}"] = p["decode_tokens_per_s"] / q["decode_tokens_per_s"] if q else None
            t = point("transformers-float32", p["prompt"])
            prefill = t["prefill_tokens_per_s"] if t else None
            p["prefill_vs_transformers"] = p["prefill_tokens_per_s"] / prefill if prefill else None
        if ref_q:
            for name, q in r["quality"].items():
                q["perplexity_vs_looplm_float32"] = q["perplexity"] / ref_q[name]["perplexity"] - 1


def label(r: dict[str, Any]) -> str:
    return f"llama.cpp {r['file_type']}" if r["row"] == "llama.cpp" and "file_type" in r else r["row"]


def table(results: dict[str, Any], prompts: list[int], bandwidth: float, matmul: float) -> str:
    head = ["row"]
    for n in prompts:
        head += [f"decode tok/s @{n}", "x llama.cpp", "x transformers"]
    head += [f"prefill tok/s @{prompts[-1]}", "x transformers", f"GFLOP/s (of {matmul:.0f})",
             "ppl prose", "ppl code", "bits/byte prose",
             "bits/byte code", "RSS growth MB", "x (1.5 W + KV)", "MB read/token",
             f"GB/s (of {bandwidth:.0f})"]
    rows = []
    for r in results.values():
        if r.get("status") != "ok":
            rows.append([r["row"], r.get("status", "?")] + [None] * (len(head) - 2))
            continue
        cells: list[Any] = [label(r)]
        for p in r["points"]:
            cells += [p["decode_tokens_per_s"], p["decode_vs_llama_cpp"], p["decode_vs_transformers"]]
        last = r["points"][-1]
        cells += [last["prefill_tokens_per_s"], last["prefill_vs_transformers"], last["prefill_gflop_per_s"]]
        q = r["quality"]
        growth = r.get("rss_growth_mb")
        cells += [q["prose"]["perplexity"], q["code"]["perplexity"], q["prose"]["bits_per_byte"],
                  q["code"]["bits_per_byte"], growth, None if growth is None else growth / r["rss_budget_mb"],
                  r["points"][0]["bytes_per_token"] / 1e6,
                  r["points"][0]["implied_gb_per_s"]]
        rows.append(cells)
    return markdown_table(head, rows)


def plot(results: dict[str, Any], prompts: list[int], path: Path) -> Path:
    ok = [r for r in results.values() if r.get("status") == "ok"]
    names = [label(r) for r in ok]
    fig, axes = subplots(3, 1, size=(4.6, 3.6))
    x = np.arange(len(ok))
    width = 0.8 / max(len(prompts), 1)
    for j, n in enumerate(prompts):
        axes[0][0].bar(x + j * width, [r["points"][j]["decode_tokens_per_s"] for r in ok], width,
                       label=f"after {n} tokens")
        axes[0][1].bar(x + j * width, [r["points"][j]["prefill_tokens_per_s"] for r in ok], width,
                       label=f"{n} tokens")
    for k, text in enumerate(("prose", "code")):
        axes[0][2].bar(x + k * 0.4, [r["quality"][text]["perplexity"] for r in ok], 0.4, label=text)
    titles = ("decode tokens/s (greedy)", "prefill tokens/s", "perplexity (held-out texts)")
    for ax, title in zip(axes[0], titles):
        ax.set_xticks(x + 0.2)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    torch.set_num_threads(s["threads"])
    gguf = model_file(args)
    out = Path(args.out)
    ckpts = prepare_checkpoints(gguf, out / "work", s["rows"], s["keep_head"], s["int8_group"],
                                s["head_group"])
    tokenizer = load_tokenizer(ckpts["float32"])
    texts: dict[str, dict[str, Any]] = {}
    for name, path in (("prose", args.prose), ("code", args.code or code_text())):
        ids = tokenizer.encode(read_text(path, name))[:s["eval_tokens"]]
        if len(ids) < 2:
            raise LoopLMError(f"the {name} text {path} has fewer than 2 tokens")
        texts[name] = {"path": str(path), "ids": ids, "bytes": scored_bytes(tokenizer, ids)}
    prompt_ids = texts["prose"]["ids"] + texts["code"]["ids"]
    while len(prompt_ids) < max(s["prompts"]):
        prompt_ids = prompt_ids * 2
    bandwidth = memory_bandwidth(s["bandwidth_bytes"])
    config = load_config(ckpts["float32"])
    matmul = matmul_gflops(config.d_model, config.ffn_dim, rows=64 if args.quick else 1024)
    job = {**s, "gguf": str(gguf), "ckpts": {k: str(v) for k, v in ckpts.items()}, "texts": texts,
           "prompt_ids": prompt_ids[:max(s["prompts"])]}
    job_path = out / "work" / "job.json"
    job_path.write_text(json.dumps(job))
    results = {}
    for row in s["rows"]:
        results[row] = run_row(row, job_path, s["threads"])
        if not args.quick:
            print(f"{row}: {results[row].get('status')}", flush=True)
    ratios(results)
    for r in results.values():
        for p in r.get("points", []):
            seconds = p["prompt"] / p["prefill_tokens_per_s"]
            p["prefill_gflop_per_s"] = prefill_flops(config, p["prompt"]) / seconds / 1e9
            p["prefill_vs_matmul"] = p["prefill_gflop_per_s"] / matmul
    info = {**machine_info(), "memory_bandwidth_gb_per_s": bandwidth, "matmul_gflop_per_s": matmul}
    summary = {"settings": {k: v for k, v in s.items()}, "model": str(gguf),
               "texts": {k: {"path": v["path"], "tokens": len(v["ids"]) - 1, "bytes": v["bytes"]}
                         for k, v in texts.items()},
               "machine": info, "results": results}
    path = write_json(out, "pretrained", summary)
    figure = plot(results, s["prompts"], out / "pretrained.png")
    if args.plot:
        plot(results, s["prompts"], Path(args.plot))
    print(table(results, s["prompts"], bandwidth, matmul))
    print(f"memory bandwidth {bandwidth:.1f} GB/s, float32 matmul {matmul:.0f} GFLOP/s; "
          f"wrote {path} and {figure}")
    return 0


def _child(argv: list[str]) -> int:
    row, job_path, *flags = argv
    job = json.loads(Path(job_path).read_text())
    job["extra_bufts"] = "--no-extra-bufts" not in flags
    print(json.dumps(measure(row, job)))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
