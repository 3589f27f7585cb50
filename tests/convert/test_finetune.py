"""Fine-tuning from a checkpoint: LoRA adapters are the only trainable (and the only changed)
parameters, a router can be added to a converted model, distillation is a KL that vanishes
against itself, and ``looplm linearize`` → ``looplm train --init --lora --distill`` runs under
torchrun with 2 processes (DDP or FSDP2) as with 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looplm.checkpoint import save_model
from looplm.convert.recursify import recursify
from looplm.data import ByteTokenizer
from looplm.errors import ConfigError
from looplm.layers.lora import lora_parameters
from looplm.quant.ptq import quantize_model
from looplm.train.finetune import distillation, init_model, merge_adapters
from tests.model.util import model, tokens

ROOT = Path(__file__).resolve().parents[2]


def checkpoint(path: Path, m) -> Path:
    save_model(m, path)
    ByteTokenizer().save(path)
    return path


def test_lora_adapters_are_the_only_trainable_parameters_and_start_as_the_original(tmp_path):
    src = model()
    m = init_model(str(checkpoint(tmp_path / "src", src)), {}, lora_rank=4).eval()
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(m)} and trainable
    x = tokens()
    torch.testing.assert_close(m(x).logits, src(x).logits, atol=0, rtol=0)
    m(x, x).loss.backward()
    assert all((p.grad is None) != p.requires_grad for p in m.parameters())


def test_merged_adapters_compute_the_same_model(tmp_path):
    m = init_model(str(checkpoint(tmp_path / "src", model(mixer="liger_gla", window=3))), {}, lora_rank=4)
    for p in lora_parameters(m):
        p.data.normal_(0, 0.1)
    merged = merge_adapters(m.eval()).eval()
    assert merged.config.lora_rank == 0 and not lora_parameters(merged)
    x = tokens()
    torch.testing.assert_close(merged(x).logits, m(x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_adapters(recursify(model(n_prelude=0, n_core=2, n_coda=0), 2, lora_rank=2))


def test_a_router_is_added_to_a_recursified_model_and_shapes_cannot_change(tmp_path):
    rec = recursify(model(n_prelude=0, n_core=4, n_coda=0), 2, "average", lora_rank=2)
    path = str(checkpoint(tmp_path / "rec", rec))
    m = init_model(path, {"router": "expert_choice"})
    assert m.router is not None
    kept = rec.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in m.state_dict().items() if not k.startswith("router."))
    with pytest.raises(ConfigError, match="shape"):
        init_model(path, {"d_ffn": 64})


def test_distillation_is_zero_against_itself_and_trains_only_the_student():
    teacher, student = model(seed=0), model(seed=1)
    extra = distillation(teacher, weight=2.0)
    x = tokens()
    assert float(extra(x, teacher(x))) == pytest.approx(0.0, abs=1e-6)
    student.train()
    loss = extra(x, student(x))
    assert float(loss) > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def _train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "val_loss" not in r}


def test_linearize_then_lora_distillation_under_torchrun_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "LOOPLM_CACHE": str(tmp_path / "cache"), "LOOPLM_NO_CPP_EXT": "1",
           "TMPDIR": str(tmp_path)}  # torchrun's rendezvous directories land here, not in /tmp
    src = checkpoint(tmp_path / "src", model(vocab_size=320, n_heads=4, n_kv_heads=2))

    def looplm(*args: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.Popen:
        return subprocess.Popen([*launcher, "-m", "looplm", *args], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def finish(proc: subprocess.Popen) -> str:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        return out

    finish(looplm("linearize", str(src), "--mixer", "gla", "--keep-attention", "2", "--window", "4",
                  "--out", str(tmp_path / "lin")))
    common = ["train", "--init", str(tmp_path / "lin"), "--lora", "4", "--distill", str(src), "--no-progress",
              "--data", "finetune", "--set", "seq_len=32", "batch_size=4", "steps=5", "warmup_steps=1",
              "min_lr_ratio=1.0", "lr=1e-2", "log_interval=1", "eval_interval=5", "eval_iters=1",
              "sample_tokens=0", "max_files=10", "threads=1"]
    finish(looplm(*common, "max_tokens=128", "--out", str(tmp_path / "warm")))  # the corpus cache
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    ddp = looplm(*common, "--out", str(tmp_path / "ddp"), launcher=torchrun)
    out = finish(looplm(*common, "grad_accum=2", "--out", str(tmp_path / "one")))
    assert "(LoRA)" in out
    finish(ddp)
    # FSDP2: the frozen weights sharded beside the adapters, the teacher whole in each process
    assert "FSDP2" in finish(looplm(*common, "fsdp=true", "--out", str(tmp_path / "fsdp"), launcher=torchrun))
    one = _train_losses(tmp_path / "one")
    assert len(one) == 5
    for run in ("ddp", "fsdp"):
        two = _train_losses(tmp_path / run)
        for step in one:
            assert abs(two[step] - one[step]) < 1e-4, (run, step, two[step], one[step])
    before = load_file(str(tmp_path / "lin" / "model.safetensors"))
    after = load_file(str(tmp_path / "one" / "ckpt-000005" / "model.safetensors"))
    changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert changed and all(".lora_" in k for k in changed)
    sharded = load_file(str(tmp_path / "fsdp" / "ckpt-000005" / "model.safetensors"))
    for k in after:
        torch.testing.assert_close(sharded[k], after[k], rtol=1e-4, atol=1e-5)


def test_quantising_a_model_with_adapters_is_one_error():
    with pytest.raises(ConfigError, match="LoRA adapters"):
        quantize_model(model(lora_rank=2), "int8")
