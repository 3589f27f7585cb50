"""torch.compile (fullgraph: no graph break) and torch.export of the vanilla, gated-DeltaNet and
hybrid configurations and an MoE++ one: the traced model's logits equal the eager ones.

While torch.compile traces, the C++ kernels and the hand-written in-place autograd Functions give
way to their PyTorch forms (``cpp_ext.available()`` is False, ``delta_chunk_traced``), which the
compiler can trace and differentiate; eager runs keep the kernels, so the comparison is kernels vs
PyTorch forms. torch.export keeps the kernels (their fake implementations, ops/kernel_tracing.py).
"""

import pytest
import torch

from looplm.model import LoopConfig, LoopLM
from looplm.ops import cpp_ext

CONFIGS = {"vanilla": {}, "gated_deltanet": {"mixer": "gated_deltanet"},
           "hybrid": {"mixer": "gated_deltanet", "attn_every": 2},
           # MoE++ (zero, copy, constant experts): traced without .tolist() (MoE.every_expert)
           "moe": {"ffn": "moe", "n_experts": 4, "top_k": 2, "zero_experts": 3, "d_ffn": 32}}


def _model(name: str) -> LoopLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, d_model=64, n_heads=2, n_core=2, max_seq_len=64)
    return LoopLM(LoopConfig(**cfg, **CONFIGS[name]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fullgraph_compile_has_no_graph_break_and_matches_eager(name):
    model = _model(name)
    ids = torch.randint(0, 256, (2, 40))  # not a multiple of the delta rule's chunk: padding traced too
    eager = model(ids, ids)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, ids)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    compiled = torch.compile(model, fullgraph=True, backend="eager")(ids, ids)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(compiled.loss, list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(eager.loss, list(model.parameters()), allow_unused=True)
    for g, w in zip(grads, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


NORM_FFN = {"looplm.rms_norm_forward", "looplm.swiglu_forward"}
KERNELS = {"vanilla": NORM_FFN | {"looplm.rope_rotate"},
           "gated_deltanet": NORM_FFN | {"looplm_traced.delta_chunk"}}
KERNELS["hybrid"] = KERNELS["vanilla"] | KERNELS["gated_deltanet"]
KERNELS["moe"] = {"looplm.rms_norm_forward", "looplm.rope_rotate"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_keeps_the_kernels_and_matches_eager(name):
    model = _model(name).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        eager = model(ids).logits
        program = torch.export.export(model, (ids,))
        torch.testing.assert_close(program.module()(ids).logits, eager, atol=1e-5, rtol=1e-5)
    ops = {str(n.target).rsplit(".", 1)[0] for n in program.graph.nodes if n.op == "call_function"}
    if cpp_ext.available():
        assert KERNELS[name] <= ops, sorted(ops)
