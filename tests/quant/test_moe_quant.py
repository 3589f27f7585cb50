"""Quantised MoE experts: PTQ, QAT and ``looplm quantize`` store every expert matrix in the
format, and decoding runs the quantised expert path."""

import copy
import re

import pytest
import torch
from safetensors.torch import load_file

from looplm.checkpoint import load_model, save_model
from looplm.cli import main
from looplm.generate import generate_ids
from looplm.layers.layer_step import layer_step
from looplm.layers.moe import MoE
from looplm.model import LoopConfig, LoopLM
from looplm.quant.linear import QuantExperts
from looplm.quant.ptq import quantize_model
from looplm.quant.qat import apply_qat, remove_qat

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EXPERT_KEY = re.compile(r"\.ffn\.w_(in|out)(\.|$)")  # an MoE's stacked experts, not the shared one


def moe_model(**kw) -> LoopLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, d_model=64, n_heads=2, n_core=2, n_recursions=1, ffn="moe", n_experts=4,
               top_k=2, d_ffn=64, max_seq_len=64)
    return LoopLM(LoopConfig(**{**cfg, **kw})).eval()


def _float_experts(q: LoopLM) -> LoopLM:
    """``q`` with each quantised expert stack back in float: its dequantised weight."""
    ref = copy.deepcopy(q)
    for m in ref.modules():
        if isinstance(m, MoE):
            for leaf in ("w_in", "w_out"):
                w = getattr(m, leaf).weight
                delattr(m, leaf)
                setattr(m, leaf, torch.nn.Parameter(w))
    return ref


def _expert_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if EXPERT_KEY.search(k) and ".shared." not in k}


@pytest.mark.parametrize("name, group", [("int4", 32), ("int8", None), ("fp8_e4m3", None), ("fp4_mx", None)])
def test_every_expert_weight_is_stored_quantised_and_the_forward_uses_it(tmp_path, name, group):
    model = moe_model(shared_expert=True, zero_experts=3)
    ids = torch.randint(0, 256, (2, 12))
    q = quantize_model(model, name, group_size=group, kernel="dequant")
    moes = [n for n, m in q.named_modules() if isinstance(m, MoE)]
    listed = q.quantization["modules"]
    assert moes and all(f"{n}.{leaf}" in listed for n in moes for leaf in ("w_in", "w_out"))
    save_model(q, tmp_path)
    stored = _expert_tensors(load_file(str(tmp_path / "model.safetensors")))
    # the codes are integers / fp8 / packed nibbles; only per-row or per-group scales stay float
    codes = {k: v for k, v in stored.items() if not k.endswith((".scale", ".offset"))}
    assert codes and all(v.dtype not in FLOATS for v in codes.values()), {k: v.dtype for k, v in codes.items()
                                                                          if v.dtype in FLOATS}
    scales = sum(v.numel() for k, v in stored.items() if k not in codes)
    assert scales * 8 <= sum(v.numel() for v in codes.values())
    with torch.no_grad():
        want, got = _float_experts(q)(ids).logits, q(ids).logits
        plain = model(ids).logits
        loaded = load_model(tmp_path)(ids).logits  # the default kernel (int8 activations for int4/int8)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (loaded - got).norm() / got.norm() < 3e-2  # an int8 activation's error per layer
    assert (got - plain).norm() / plain.norm() < {"int8": 0.02, "fp8_e4m3": 0.1}.get(name, 0.3)


def _step_logits(model: LoopLM, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-forward logits at positions prompt-1.., the same from prefill + one-token steps)."""
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prompt], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], state=out.state)
            steps.append(out.logits[:, -1])
    return full[:, prompt - 1:-1], torch.stack(steps, 1)


@pytest.mark.parametrize("kernel", ["dequant", "auto"])
def test_int4_experts_decode_through_the_quantised_modules_and_step_equals_forward(kernel):
    model = quantize_model(moe_model(shared_expert=True), "int4", group_size=32, kernel=kernel)
    calls = []
    for m in model.modules():
        if isinstance(m, QuantExperts):
            real = m.forward
            m.forward = lambda e, x, real=real: calls.append(x.shape[0]) or real(e, x)
    layer = model.core[0]
    x = torch.randn(1, 1, 64)
    assert layer_step(layer, x, layer.mixer.init_state(1), None, None) is None  # Python layer, not moe_step
    ids = torch.randint(0, 256, (1, 10))
    full, steps = _step_logits(model, ids, 6)
    assert 1 in calls  # one-token steps ran the quantised experts
    if kernel == "dequant":  # the same weights in float: step == forward
        torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    else:  # decoding rows take the int8-activation kernel (ops.qlinear), the forward bf16 ones
        assert (steps - full).abs().max() <= 0.03 * full.abs().max()
    assert len(generate_ids(model, ids.tolist(), max_new_tokens=3)[0]) == 3


def test_qat_fake_quantises_experts_like_the_quantised_model():
    model = moe_model(zero_experts=3)
    ids = torch.randint(0, 256, (2, 12))
    qat = apply_qat(copy.deepcopy(model), "int4", group_size=32)
    quantised = quantize_model(copy.deepcopy(model), "int4", group_size=32, kernel="dequant")
    with torch.no_grad():
        want, got, plain = quantised(ids).logits, qat(ids).logits, model(ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(qat.state_dict()) == set(model.state_dict())  # the checkpoint stays float
    qat(ids, ids).loss.backward()  # straight-through to the experts
    assert all(m.w_in.grad is not None and m.w_in.grad.abs().sum() > 0
               for m in qat.modules() if isinstance(m, MoE))
    remove_qat(qat)
    with torch.no_grad():
        torch.testing.assert_close(qat(ids).logits, plain)


def test_quantize_command_shrinks_an_moe_checkpoint_to_under_40_percent(tmp_path, capsys):
    model = moe_model(n_experts=8, d_ffn=128, tie_embeddings=True)
    save_model(model, tmp_path / "f32")
    assert main(["quantize", str(tmp_path / "f32"), "--format", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "q")]
    assert sizes[1] <= 0.40 * sizes[0], sizes
    q = load_model(tmp_path / "q")
    assert not _expert_tensors({k: v for k, v in q.state_dict().items() if v.dtype in FLOATS
                                and not k.endswith((".scale", ".offset"))})
