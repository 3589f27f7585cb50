"""``looplm train``: a YAML config (+ flags) → corpus, tokenizer, model → the training loop.

Runs the same under ``torchrun --nproc_per_node=N`` (DDP, or FSDP2 with ``--set fsdp=true``;
each rank its own share of every batch). ``--set key=value`` overrides any field of the
``model:`` or ``train:`` section.
``--init DIR`` fine-tunes a checkpoint instead (its model and tokenizer; ``--set`` model fields
change it, e.g. ``router=expert_choice``), ``--lora RANK`` trains LoRA adapters only and
``--distill TEACHER`` adds a KL loss against a teacher checkpoint's logits (train/finetune.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from looplm.checkpoint import load_model
from looplm.data import BatchSampler, Corpus, Tokenizer, prepare_corpus
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import ConfigError
from looplm.generate import generate
from looplm.memory import TRAIN_BYTES_PER_PARAM, check_fits
from looplm.model import LoopConfig, LoopLM
from looplm.quant.formats import FORMATS
from looplm.quant.qat import apply_qat
from looplm.train import distributed
from looplm.train.config import TrainConfig, apply_overrides, load_sections
from looplm.train.distributed import Dist
from looplm.train.finetune import distillation, init_model
from looplm.train.loop import train
from looplm.train.run_dir import check_run_dir, lock_on_rank0

RUN_FILE = "run.json"  # the full config of the run, written into every checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="small", help="tiny | small | a baseline name | PATH.yaml")
    parser.add_argument("--data", help="corpus: stdlib (default), files, directories, globs, .jsonl, "
                        ".parquet, hf:NAME")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], help="byte (default) or bpe")
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    parser.add_argument("--out", help="run directory (checkpoints, metrics.jsonl)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override any config field: lr=1e-3, model.d_model=128, train.bf16=true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--qat", choices=FORMATS,
                        help="quantisation-aware training: fake-quantise weights in this format")
    parser.add_argument("--init", metavar="DIR", help="fine-tune this checkpoint (its model and tokenizer)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="with --init: train LoRA adapters of this rank only, everything else frozen")
    parser.add_argument("--distill", metavar="TEACHER", help="add a KL loss against this checkpoint's logits")
    parser.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distillation loss")


def model_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(LoopConfig)]


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], TrainConfig]:
    """The model dict and TrainConfig of the run: config file, then flags, then ``--set``."""
    sections = load_sections(args.config)
    flags = {"data": args.data, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
             "out": args.out, "steps": args.steps}
    sections["train"].update({k: v for k, v in flags.items() if v is not None})
    sections = apply_overrides(sections, args.set, model_keys())
    train_cfg = TrainConfig.from_dict(sections["train"])
    if getattr(args, "init", None):  # --set changes the checkpoint's own config: init_model checks it
        return sections["model"], train_cfg
    config = LoopConfig.from_dict(sections["model"])  # fail on a bad model key before touching the data
    vocab = 64 * math.ceil((259 if train_cfg.tokenizer == "byte" else train_cfg.vocab_size) / 64)
    check_fits(dataclasses.replace(config, vocab_size=max(vocab, config.vocab_size)), TRAIN_BYTES_PER_PARAM,
               "training this model")
    return sections["model"], train_cfg


def build_model(model_cfg: dict[str, Any], vocab_size: int, seed: int) -> LoopLM:
    """LoopLM with the tokenizer's vocabulary (padded to a multiple of 64), seeded."""
    if "vocab_size" in model_cfg and model_cfg["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg['vocab_size']} is smaller than the tokenizer's "
                          f"{vocab_size}; remove it from the config (it is set from the tokenizer)")
    config = LoopConfig.from_dict({**model_cfg, "vocab_size": 64 * math.ceil(vocab_size / 64)})
    torch.manual_seed(seed)
    return LoopLM(config)


def load_corpus(
    cfg: TrainConfig, d: Dist, tokenizer: Tokenizer | None = None, progress: bool = True
) -> Corpus:
    """The run's corpus from the cache (rank 0 builds it first; the others then read it)."""
    spec = tokenizer or ("byte" if cfg.tokenizer == "byte" else f"bpe:{cfg.vocab_size}")
    kwargs: dict[str, Any] = dict(max_files=cfg.max_files or None, progress=progress and d.main,
                                  text_field=cfg.text_field)
    corpus = prepare_corpus(cfg.data, spec, **kwargs) if d.main else None
    distributed.barrier(d)
    return corpus or prepare_corpus(cfg.data, spec, **kwargs)


def describe(corpus: Corpus) -> str:
    s = corpus.stats
    return (f"{s.source}: {s.documents:,} documents, {s.bytes / 1e6:.1f} MB, "
            f"{s.train_tokens:,} train / {s.val_tokens:,} validation tokens ({corpus.tokenizer.kind})")


def sampler(corpus: Corpus, cfg: TrainConfig) -> Callable[[torch.nn.Module], str]:
    """``sample(model) -> str``: a short seeded continuation of ``cfg.sample_prompt``."""
    def sample(model: torch.nn.Module) -> str:
        if not isinstance(model, LoopLM):
            raise TypeError(f"samples come from a LoopLM, not a {type(model).__name__}")
        text = generate(model, corpus.tokenizer, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens,
                        temperature=0.8, top_k=50, seed=cfg.seed)
        return cfg.sample_prompt + text

    return sample


def run(args: argparse.Namespace) -> int:
    model_cfg, cfg = resolve(args)
    d = distributed.setup()
    try:
        code = _train(args, model_cfg, cfg, d)
        distributed.barrier(d)  # no rank leaves while another still talks to it (checkpoint writes)
        return code
    finally:  # on an error too: a process group left to the interpreter's exit can abort it (gloo threads)
        distributed.teardown()


def _train(args: argparse.Namespace, model_cfg: dict[str, Any], cfg: TrainConfig, d: Dist) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out)
    check_run_dir(run_dir)  # before the corpus is read: a bad --out fails at once
    if distributed.broadcast_float(float(run_dir.is_dir()), d):  # rank 0's view; train() locks a new one
        lock_on_rank0(run_dir, d)  # a second run of an existing directory too
    init = getattr(args, "init", None)
    if (getattr(args, "lora", 0) or getattr(args, "distill", None)) and not init:
        raise ConfigError("--lora and --distill fine-tune a checkpoint: give it with --init DIR")
    tokenizer = load_tokenizer(init) if init else None
    corpus = load_corpus(cfg, d, tokenizer, progress=not args.no_progress)
    if init:
        overrides = apply_overrides({"model": {}, "train": {}}, args.set, model_keys())["model"]
        torch.manual_seed(cfg.seed)
        model = init_model(init, overrides, args.lora)
    else:
        model = build_model(model_cfg, corpus.tokenizer.vocab_size, cfg.seed)
    extra_loss = None
    if getattr(args, "distill", None):
        extra_loss = distillation(load_model(args.distill).to(d.device), args.distill_weight)
    if getattr(args, "qat", None):  # quantisation-aware training; checkpoints stay float
        apply_qat(model, args.qat)
    if d.main:
        n = model.num_params()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable < n:
            print(f"fine-tuning {trainable / 1e6:.3f}M of {n / 1e6:.2f}M parameters (LoRA)")
        print(f"model: {n / 1e6:.2f}M parameters ({model.num_params(unique=False) / 1e6:.2f}M with reuse), "
              f"corpus: {describe(corpus)}, {d.world} process(es) on {d.device}")
    run_info = {"model": model.config.to_dict(), "train": cfg.to_dict(), "qat": getattr(args, "qat", None),
                "init": init, "lora": getattr(args, "lora", 0), "distill": getattr(args, "distill", None)}

    def extras(directory: Path) -> None:
        corpus.tokenizer.save(directory)
        (directory / RUN_FILE).write_text(json.dumps(run_info, indent=1))

    train_data = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=d.rank,
                              world_size=d.world)
    token_bytes = torch.from_numpy(corpus.tokenizer.token_nbytes())
    row = train(cfg, model, train_data, corpus.val.tokens, d=d, resume=args.resume, token_bytes=token_bytes,
                extras=extras, sample=sampler(corpus, cfg), progress=not args.no_progress,
                extra_loss=extra_loss)
    if d.main and not row.get("finished"):
        bpb = f", val bits/byte {row['val_bpb']:.3f}" if "val_bpb" in row else ""
        print(f"done: step {row.get('step')}, val loss {row.get('val_loss', float('nan')):.4f}{bpb}; "
              f"checkpoint {run_dir / 'latest'}")
    return 0
