"""``looplm bench quant``: what each low-precision format costs in quality and buys in size/speed.

Quality (a trained checkpoint, ``--checkpoint`` or one trained here on the stdlib corpus): per
weight format, checkpoint size, validation bits/byte and its delta against float32, batch-1
greedy decoding tokens/s as a ratio to float32 (all models timed side by side, interleaved
repeats, medians), weights in memory; QAT rows fine-tune the float model ``--qat-steps`` with
fake quantisation (a float row fine-tuned the same steps is their reference); and the decoding
state stored in int8 / FP8 (stepwise loss, state bytes).

Speed (``≥ 100M`` random weights, float32 decoding memory-bound): per-token decode time of
float32 against int8 and int4 (g=64) through the default kernels and through dequantise-then-
matmul. Targets: int8 ≥ 1.5×, int4 ≥ 2× float32 tokens/s.

Writes ``quant.json``, ``quant.md`` and ``quant.png`` (bits/byte delta against bits per weight;
decode speed ratios) to ``--out``. ``--quick`` shrinks everything to seconds (for the test).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import machine_info, markdown_table, time_interleaved, write_json
from looplm.bench.runner import save_figure, subplots, train_model
from looplm.checkpoint import load_model, save_model
from looplm.data import BatchSampler, eval_batches, load_tokenizer
from looplm.generate import generate_ids
from looplm.model import LoopConfig, LoopLM
from looplm.quant.formats import make_format
from looplm.quant.ptq import quantize_model
from looplm.quant.qat import apply_qat, remove_qat
from looplm.quant.state import stepwise_loss
from looplm.train import command as train_command
from looplm.train.command import load_corpus
from looplm.train.config import TrainConfig
from looplm.train.distributed import Dist
from looplm.train.loop import evaluate

FORMAT_ROWS = [("int8", None), ("fp8_e4m3", None), ("fp8_e5m2", None), ("int4", 128), ("int4", 64),
               ("int4", 32), ("fp4_mx", None)]
QAT_ROWS = [("int4", 64), ("fp4_mx", None)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="trained float checkpoint (default: train one here)")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the model trained here")
    parser.add_argument("--qat-steps", type=int, default=100, help="QAT fine-tuning steps (0: no QAT rows)")
    parser.add_argument("--eval-iters", type=int, default=8, help="validation batches (of 8 x seq_len)")
    parser.add_argument("--decode-tokens", type=int, default=8, help="tokens per timed decode")
    parser.add_argument("--speed-d-model", type=int, default=1024, help="width of the random speed model")
    parser.add_argument("--speed-layers", type=int, default=8, help="layers of the random speed model")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (default 1: ratios stay stable on a shared machine)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (medians)")
    parser.add_argument("--quick", action="store_true", help="seconds-sized run for the test")
    parser.add_argument("--out", default="bench_results/quant", help="output directory")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (incl. kernel layouts cached by QuantLinear)."""
    n = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        for t in getattr(m, "_int4_cache", None) or ():
            n += t.numel() * t.element_size()
    return n


def _checkpoint(args: argparse.Namespace, work: Path) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    steps = 3 if args.quick else args.train_steps
    size = ["max_files=30", "d_model=64", "n_core=2", "batch_size=8"] if args.quick else \
        ["max_files=300", "d_model=256", "n_core=4", "batch_size=8"]
    sets = [f"steps={steps}", f"eval_interval={steps}", "sample_tokens=0", "lr=3e-3", "seq_len=128",
            "max_seq_len=256", *size]
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    flags = ["--config", "tiny", "--no-progress", "--set", *sets, "--out", str(work / "run")]
    if train_command.run(parser.parse_args(flags)):
        raise RuntimeError("training the bench model failed")
    return work / "run" / "latest"


def _data(ckpt: Path, seq_len: int, quick: bool):
    """Validation windows, token byte lengths and a train batch function of the checkpoint's corpus."""
    saved = ckpt / "run.json"
    train_cfg = json.loads(saved.read_text())["train"] if saved.is_file() else {}
    kept = ("data", "tokenizer", "vocab_size", "max_files")
    cfg = TrainConfig.from_dict({k: v for k, v in train_cfg.items() if k in kept})
    corpus = load_corpus(cfg, Dist(), load_tokenizer(ckpt), progress=False)
    def batches():  # the same batches for every fine-tuning run
        sampler = iter(BatchSampler(corpus.train, 4 if quick else 8, seq_len, seed=1))
        return lambda step: next(sampler)

    token_bytes = torch.from_numpy(corpus.tokenizer.token_nbytes())
    return corpus, batches, token_bytes, eval_batches


def quality(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ckpt = _checkpoint(args, work)
    base = load_model(ckpt).eval()
    seq_len = min(128, base.config.max_seq_len)
    corpus, batches, token_bytes, eval_batches = _data(ckpt, seq_len, args.quick)
    iters = 1 if args.quick else args.eval_iters
    windows = list(eval_batches(corpus.val.tokens, 8, seq_len, max_batches=iters))

    def bpb(model) -> float:
        with torch.inference_mode():
            return evaluate(model, windows, token_bytes)["val_bpb"]

    def size(model, name) -> int:
        save_model(model, work / name)
        return (work / name / "model.safetensors").stat().st_size

    models = {"float32": base}
    rows: dict[str, dict[str, Any]] = {
        "float32": {"bits": 32.0, "size": size(base, "float32"), "bpb": bpb(base)}}
    for fmt, g in FORMAT_ROWS:
        name = fmt if g is None or (fmt == "int4" and g == 64) else f"{fmt}_g{g}"
        q = quantize_model(copy.deepcopy(base), fmt, group_size=g).eval()
        models[name] = q
        rows[name] = {"bits": make_format(fmt, g).bits, "size": size(q, name), "bpb": bpb(q)}
    qat_steps = 2 if args.quick else args.qat_steps
    if qat_steps:
        tuned = copy.deepcopy(base)
        train_model(tuned, batches(), steps=qat_steps, lr=3e-4)
        rows["float32 +ft"] = {"bits": 32.0, "size": rows["float32"]["size"], "bpb": bpb(tuned.eval())}
        for fmt, g in QAT_ROWS:
            m = apply_qat(copy.deepcopy(base), fmt, group_size=g)
            train_model(m, batches(), steps=qat_steps, lr=3e-4)
            q = quantize_model(remove_qat(m), fmt, group_size=g).eval()
            name = f"{fmt} QAT"
            models[name] = q
            rows[name] = {"bits": make_format(fmt, g).bits, "size": size(q, name), "bpb": bpb(q),
                          "reference": "float32 +ft"}
    prompt = [list(windows[0][0][0, :16].tolist())]
    n = 2 if args.quick else args.decode_tokens
    fns = {k: partial(generate_ids, m, prompt, max_new_tokens=n) for k, m in models.items()}
    times = time_interleaved(fns, repeats=1 if args.quick else args.repeats)
    for name, r in rows.items():
        ref = rows[r.get("reference", "float32")]
        r["bpb_delta_pct"] = 100 * (r["bpb"] / ref["bpb"] - 1)
        r["size_pct"] = 100 * r["size"] / rows["float32"]["size"]
        if name in times:
            r["decode_speedup"] = times["float32"] / times[name]
            r["weight_mb"] = weight_bytes(models[name]) / 1e6
    ids = windows[0][0][:2, : (16 if args.quick else 64)]
    states = {}
    for state_format in (None, "int8", "fp8_e4m3"):
        loss, nbytes = stepwise_loss(base, ids, state_format)
        states[state_format or "float32"] = {"loss": loss, "state_bytes": nbytes}
    for s in states.values():
        s["loss_delta_pct"] = 100 * (s["loss"] / states["float32"]["loss"] - 1)
        s["bytes_pct"] = 100 * s["state_bytes"] / states["float32"]["state_bytes"]
    return {"checkpoint": str(ckpt), "params": base.num_params(), "formats": rows, "state": states,
            "mixer": base.config.mixer}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    d, layers = (64, 2) if args.quick else (args.speed_d_model, args.speed_layers)
    torch.manual_seed(0)
    base = LoopLM(LoopConfig(vocab_size=259, d_model=d, n_heads=max(1, d // 128), n_core=layers,
                             mixer="attention", max_seq_len=512)).eval()
    models = {"float32": base}
    for name, fmt, g, kernel in [("int8", "int8", None, "auto"), ("int4 g64", "int4", 64, "auto"),
                                 ("int8 dequant", "int8", None, "dequant"),
                                 ("int4 g64 dequant", "int4", 64, "dequant")]:
        models[name] = quantize_model(copy.deepcopy(base), fmt, group_size=g, kernel=kernel).eval()
    prompt = [list(range(16))]
    n = 2 if args.quick else args.decode_tokens
    with torch.inference_mode():
        times = time_interleaved({k: partial(generate_ids, m, prompt, max_new_tokens=n)
                                  for k, m in models.items()}, repeats=1 if args.quick else args.repeats)
    rows = {k: {"ms_per_token": 1e3 * t / n, "speedup": times["float32"] / t,
                "weight_mb": weight_bytes(models[k]) / 1e6} for k, t in times.items()}
    return {"params": base.num_params(), "d_model": d, "layers": layers, "decode_tokens": n, "rows": rows,
            "targets": {"int8": 1.5, "int4 g64": 2.0}}


def report(result: dict[str, Any]) -> str:
    q, s = result["quality"], result["speed"]
    lines = [f"### Formats ({q['params'] / 1e6:.2f}M-parameter {q['mixer']} model, {q['checkpoint']})", ""]
    lines.append(markdown_table(
        ["format", "bits/weight", "checkpoint MB", "% of float32", "val bits/byte", "Δ bpb %",
         "decode tok/s vs float32", "weights MB in memory"],
        [[k, r["bits"], r["size"] / 1e6, r["size_pct"], r["bpb"], r["bpb_delta_pct"], r.get("decode_speedup"),
          r.get("weight_mb")] for k, r in q["formats"].items()]))
    lines += ["", "QAT rows: Δ against `float32 +ft` (the float model fine-tuned the same steps).", "",
              "### Decoding state in low precision (stepwise teacher-forced loss)", ""]
    lines.append(markdown_table(["state", "loss (nats)", "Δ loss %", "state bytes", "% of float32"],
                                [[k, v["loss"], v["loss_delta_pct"], v["state_bytes"], v["bytes_pct"]]
                                 for k, v in q["state"].items()]))
    lines += ["", f"### Decode speed, batch 1 ({s['params'] / 1e6:.1f}M random weights, "
              f"{result['machine']['torch_threads']} thread(s))", ""]
    target = s["targets"]
    lines.append(markdown_table(
        ["weights", "ms/token", "tokens/s vs float32", "weights MB", "target"],
        [[k, r["ms_per_token"], r["speedup"], r["weight_mb"],
          f"≥ {target[k]}× {'PASS' if r['speedup'] >= target[k] else 'FAIL'}" if k in target else None]
         for k, r in s["rows"].items()]))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    fig, ax = subplots(2, 1, (5.5, 4.0))
    rows = result["quality"]["formats"]
    for name, r in rows.items():
        if r["bits"] < 32:
            ax[0, 0].scatter(r["bits"], r["bpb_delta_pct"], marker="*" if "QAT" in name else "o")
            ax[0, 0].annotate(name, (r["bits"], r["bpb_delta_pct"]), fontsize=7)
    ax[0, 0].set(xlabel="bits per weight (scales included)", ylabel="Δ val bits/byte vs float32 (%)",
                 title="quality loss against bits per weight")
    ax[0, 0].axhline(0, color="grey", lw=0.5)
    sp = result["speed"]["rows"]
    ax[0, 1].bar(list(sp), [r["speedup"] for r in sp.values()], color="tab:blue")
    ax[0, 1].axhline(1, color="grey", lw=0.5)
    ax[0, 1].set(ylabel="decode tokens/s ÷ float32",
                 title=f"batch-1 decoding, {result['speed']['params'] / 1e6:.0f}M")
    ax[0, 1].tick_params(axis="x", labelrotation=30, labelsize=7)
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    result: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "speed": speed(args)}
    print(f"speed: {result['speed']['rows']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["quality"] = quality(args, Path(tmp))
    md = report(result)
    result["table"] = md  # what `looplm bench report` puts into docs/results.md
    if sys.argv[1:3] == ["bench", "quant"]:
        result["command"] = " ".join(["looplm", *sys.argv[1:]])
    write_json(out, "quant", result)
    (out / "quant.md").write_text(md)
    plot(result, out / "quant.png")
    print(md)
    return 0
