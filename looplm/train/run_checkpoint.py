"""Checkpoints of a training run: everything needed to continue bit-identically.

A run directory holds ``ckpt-NNNNNN/`` directories, each::

    config.json, model.safetensors     the model (looplm.checkpoint.save_model)
    tokenizer.json / run extras        written by the ``extras`` callback
    train_state/tensors.safetensors    optimizer moments and RNG states
    train_state/state.json             step, param groups, python/numpy RNG, run counters
    checksums.json, train_state/checksums.json   SHA-256 of the weight files, verified on load

Nothing is pickled. A checkpoint is written under a temporary name, flushed to disk (fsync)
and renamed into place, so a crash or a full disk leaves either the old set or the new one,
never half a checkpoint. ``latest`` and ``best`` are symlinks to checkpoint directories.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from looplm.checkpoint import save_model as save_looplm
from looplm.checkpoint import verify_checksums, write_checksums
from looplm.errors import CheckpointError
from looplm.model import LoopLM

CKPT_RE = re.compile(r"^ckpt-(\d{6,})$")


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states of torch (CPU and CUDA), numpy and python as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(py_state), py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_weights(model: nn.Module, path: Path) -> None:
    """``looplm.checkpoint.save_model`` for a LoopLM; plain safetensors for any other module."""
    if hasattr(getattr(model, "config", None), "to_dict"):
        save_looplm(cast(LoopLM, model), path)  # a LoopLM, or a wrapper of one (compiled)
    else:
        save_model(model, str(path / "model.safetensors"))


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (files first), so a rename publishes whole data."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def _replace_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, sorted by step."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extras: Callable[[Path], None] | None = None,
    keep_last: int = 2,
    is_best: bool = False,
) -> Path:
    """Write ``run_dir/ckpt-{step}`` atomically, update ``latest``/``best``, prune old ones.

    ``state`` is JSON-able run state (counters, best loss, ...); the step is stored in it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:06d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "train_state").mkdir(parents=True)
        save_weights(model, tmp)
        if extras is not None:
            extras(tmp)
        opt_tensors, opt_meta = optimizer_state(optimizer)
        rng_tensors, rng_meta = rng_state()
        save_file({**opt_tensors, **rng_tensors}, str(tmp / "train_state" / "tensors.safetensors"))
        write_checksums(tmp / "train_state", ["tensors.safetensors"])
        meta = {"step": step, "optimizer": opt_meta, "rng": rng_meta, "run": state}
        (tmp / "train_state" / "state.json").write_text(json.dumps(meta))
        _fsync_tree(tmp)
    except (OSError, SafetensorError) as exc:  # a full disk, a file-size limit: keep what is there
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        kept = f"; {(run_dir / 'latest').resolve().name} is intact" if (run_dir / "latest").exists() else ""
        raise CheckpointError(f"cannot write checkpoint {final.name} in {str(run_dir)!r}: {reason}{kept}"
                              ) from None
    old = run_dir / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _replace_link(run_dir / "latest", final.name)
    if is_best:
        _replace_link(run_dir / "best", final.name)
    _fsync(run_dir)
    best = (run_dir / "best").resolve().name if (run_dir / "best").is_symlink() else None
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        if path.name != best:
            shutil.rmtree(path, ignore_errors=True)
    return final


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories a killed run left behind."""
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from ``ckpt``; return its run state with ``step``."""
    try:
        verify_checksums(ckpt)
        verify_checksums(ckpt / "train_state")
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{ckpt} does not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); resume with the run's own config"
            )
        tensors = load_file(str(ckpt / "train_state" / "tensors.safetensors"))
        try:
            meta = json.loads((ckpt / "train_state" / "state.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{str(ckpt / 'train_state' / 'state.json')!r} is corrupted (not JSON); "
                                  "resume from an earlier checkpoint or restore it") from None
        load_optimizer_state(optimizer, tensors, meta["optimizer"])
        set_rng_state(tensors, meta["rng"])
        run = {**meta["run"], "step": int(meta["step"])}
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(
            f"{ckpt} does not match the model ({str(exc).splitlines()[-1].strip()}); "
            "resume with the run's own config"
        ) from None
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        what = f"missing field {exc}" if isinstance(exc, KeyError) else (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"cannot resume from {ckpt}: its train_state is corrupted ({what})") from None
    return run
