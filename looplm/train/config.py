"""The run configuration: ``TrainConfig`` plus the YAML files and ``--set`` overrides.

A config file has two sections, ``model:`` (fields of ``looplm.model.LoopConfig``) and
``train:`` (fields of ``TrainConfig``), and optionally ``base: NAME``: start from that config
and change only the fields given. The built-in ``looplm/configs/NAME.yaml`` (package data) is
found by its bare name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import yaml

from looplm.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data: ships in the wheel
SCHEDULES = ("cosine", "wsd")
TOKENIZERS = ("byte", "bpe")


@dataclass
class TrainConfig:
    """Every setting of a training run except the model's architecture."""

    data: str = "stdlib"  # corpus: "stdlib", a file, directory, glob, .jsonl, .parquet, hf:NAME
    text_field: str = "text"  # the text field of .jsonl rows, .parquet columns and hf: datasets
    tokenizer: str = "byte"  # byte | bpe
    vocab_size: int = 4096  # BPE vocabulary size (ignored for byte)
    max_files: int = 0  # use only the first N files of the corpus (0 = all; for quick tests)
    batch_size: int = 16  # sequences per optimizer step, summed over ranks and accumulation
    seq_len: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    warmup_steps: int = 50  # linear warmup from 0
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_frac: float = 0.2  # wsd: fraction of steps spent in the final linear decay
    weight_decay: float = 0.1  # AdamW decay of matrices (not norms, biases, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    steps: int = 1000  # optimizer steps
    max_tokens: int = 0  # stop after this many training tokens (0 = no limit)
    max_minutes: float = 0.0  # stop after this much wall time (0 = no limit)
    eval_interval: int = 100  # steps between evaluations (and checkpoints)
    eval_iters: int = 8  # validation batches per evaluation
    bf16: bool = False  # bfloat16 autocast
    seed: int = 0  # seed of weights, batches and sampling
    out: str = "runs/default"  # run directory (checkpoints, metrics.jsonl)
    keep_last: int = 2  # checkpoints kept besides the best
    log_interval: int = 10  # steps between metric lines
    sample_prompt: str = "def "  # prompt of the sample printed at each evaluation
    sample_tokens: int = 64  # tokens of that sample (0 = no sample)
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops
    threads: int = 0  # torch CPU threads (0 = torch's default)
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2), not DDP

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and isinstance(value, bool):
                raise ConfigError(f"train.{f.name} must be a number, got {value!r}")
            if f.type == "float" and isinstance(value, int):
                setattr(self, f.name, float(value))
            elif f.type == "int" and isinstance(value, float) and value.is_integer():
                setattr(self, f.name, int(value))
            kind = cast(str, f.type)  # annotations are strings here (from __future__ import annotations)
            expected = {"int": int, "float": float, "bool": bool, "str": str}[kind]
            if not isinstance(getattr(self, f.name), expected):
                raise ConfigError(f"train.{f.name} must be {f.type}, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"train.tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        for name in ("batch_size", "seq_len", "grad_accum", "steps", "eval_interval", "eval_iters",
                     "log_interval", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}"
            )
        if not 0 <= self.decay_frac <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.decay_frac and train.min_lr_ratio must lie in [0, 1]")
        for name in ("grad_clip", "weight_decay", "max_minutes", "max_tokens", "max_files", "warmup_steps",
                     "threads", "sample_tokens"):
            if not getattr(self, name) >= 0:  # also catches NaN
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 < self.lr < math.inf):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"train.seed must lie in [0, 2**64), got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_keys(d, [f.name for f in fields(cls)], "train")
        return cls(**d)


def check_keys(d: dict[str, Any], known: list[str], section: str) -> None:
    """Raise ConfigError naming close matches for the first key of ``d`` not in ``known``."""
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown {section} key {key!r}{hint}")


def resolve_config_path(name: str) -> Path:
    """``tiny`` → ``looplm/configs/tiny.yaml``; a path is returned as is (it must exist)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config {name!r} not found; use a YAML path or one of: {', '.join(names)}")
    return path


def load_sections(name: str, _seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Read ``{"model": {...}, "train": {...}}`` from a config name or YAML path (after its base)."""
    path = resolve_config_path(name)
    if str(path) in _seen:
        raise ConfigError(f"config {path} is its own base (through {' -> '.join(_seen)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with sections model: and train:")
    check_keys(raw, ["base", "model", "train"], "top-level")
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    if raw.get("base"):
        out = load_sections(str(raw["base"]), (*_seen, str(path)))
    for section in ("model", "train"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"{path}: {section}: must be a mapping of field: value")
        out[section].update(raw.get(section) or {})
    return out


def apply_overrides(
    sections: dict[str, dict[str, Any]], overrides: list[str], model_keys: list[str]
) -> dict[str, dict[str, Any]]:
    """Apply ``key=value`` strings; ``key`` is ``train.x``, ``model.x`` or a bare field name
    (a name both sections have, such as ``vocab_size``, must be prefixed: ConfigError otherwise).

    Values are parsed as YAML scalars (``3e-4`` → float, ``true`` → bool).
    """
    train_keys = [f.name for f in fields(TrainConfig)]
    out = {k: dict(v) for k, v in sections.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        section, dot, field = key.rpartition(".")
        if not dot:
            if field in train_keys and field in model_keys:
                raise ConfigError(f"--set {field}= is ambiguous: both the model and the train section have "
                                  f"{field!r}; write model.{field}= or train.{field}=")
            section = "train" if field in train_keys else "model" if field in model_keys else ""
            if not section:
                check_keys({field: None}, train_keys + model_keys, "config")
        if section not in ("train", "model"):
            raise ConfigError(f"--set key {key!r} must start with train. or model.")
        check_keys({field: None}, train_keys if section == "train" else model_keys, section)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[section][field] = value
    return out
