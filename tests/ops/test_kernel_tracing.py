"""The C++ kernels' fake implementations agree with the kernels (``torch.library.opcheck``: schema,
fake tensor shapes and dtypes, ``make_fx`` tracing), so ``torch.export`` can put them in a graph."""

import pytest
import torch

from looplm.ops import cpp_ext, kernel_tracing
from looplm.ops.delta_chunkwise import DeltaChunkFn, tile_rows
from looplm.ops.kv_quant import quantize_rows
from looplm.quant.formats import quantize_int8

pytestmark = pytest.mark.skipif(not cpp_ext.available(), reason="the C++ kernels are not built here")


def _samples() -> dict[str, list[tuple]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, w, h, gate = r(3, 64), r(5, 64), r(4, 16), r(3, 64)
    q8, s8 = quantize_int8(w).values()
    g8 = quantize_int8(w, 32)["scale"]  # int8 in groups of 32
    cos, sin = r(1, 3, 1, 4), r(1, 3, 1, 4)
    y, rr = torch.ops.looplm.rms_norm_forward(x, r(64), gate, 1e-6)
    return {**_step_samples(r), **_delta_backward_samples(r),
        "linear_small": [(x, w, None), (x, w, r(5))],
        "qlinear": [(x, [q8, s8]), (x, [q8, g8])],
        "qembedding": [(torch.tensor([0, 4, 2]), [q8, s8]), (torch.tensor([1]), [q8, g8])],
        "rope_rotate": [(r(1, 3, 2, 8), cos, sin, 1)],
        "rms_norm_forward": [(x, r(64), None, 1e-6), (x, r(64), gate, 1e-6)],
        "rms_norm_backward": [(r(3, 64), x, rr, r(64), gate, True), (r(3, 64), x, rr, r(64), None, False)],
        "swiglu_forward": [(h, None), (h, r(4))],
        "swiglu_backward": [(r(4, 8), h, r(4), True), (r(4, 8), h, None, False)],
    }


def _step_samples(r) -> dict[str, list[tuple]]:
    """Arguments of the decoding-step kernels: B = 2 rows, width d = 16, 2 heads of 4 (1 key head
    for attention), an FFN of 8 (and without one), 3 experts."""
    B, d, H, dk, dv, K, F = 2, 16, 2, 4, 4, 3, 8
    C = 2 * H * dk + H * dv
    common = (r(B, d), r(B, K - 1, C), r(B, H, dk, dv), r(d), r(C, d), r(C, K), r(H * dv, d), r(dv),
              r(d, H * dv))
    ffn, eps = (r(d), r(2 * F, d), r(d, F)), (1e-6, 1e-6, 1e-6)
    beta = (r(H, d), r(H))
    Hkv, D, S = 1, 4, 5
    attn_out = (r(B, d), r(B, H, D), r(B, S, Hkv, D), r(B, S, Hkv, D), [r(d, H * D)])
    (k8, k_scale), (v8, v_scale) = (quantize_rows(t, torch.int8) for t in attn_out[2:4])  # an int8 cache
    return {
        "delta_layer_step": [(*common, None, None, None, *eps, *beta, None, None, None),
                             (*common, *ffn, *eps, *beta, r(H, d), r(H), r(H))],
        "decay_layer_step": [(*common, None, None, None, *eps, 1, None, r(H, d), r(H), None, None, 1.0),
                             (*common, *ffn, *eps, 0, r(H), None, None, None, None, 1.0)],
        "attn_step_in": [(r(B, d), r(d), 1e-6, [r((H + 2 * Hkv) * D, d)], r(D // 2), torch.tensor([3, 7]),
                          H, Hkv)],
        "attn_step_out": [(*attn_out, None, [], [], 1e-6, None),
                          (*attn_out, r(d), [r(2 * F, d)], [r(d, F)], 1e-6, torch.tensor([0, 2])),
                          (*attn_out[:2], k8, v8, *attn_out[4:], None, [], [], 1e-6, None, k_scale, v_scale),
                          (*attn_out, None, [], [], 1e-6, None, None, None, r(B, H, D))],
        "liger_gla_step": [(r(B, H + 2 * Hkv, D), r(B, H, D, D), H, Hkv, 16.0, r(D // 2),
                            torch.tensor([3, 7]))],
        "attn_stack_step": [(r(B, d), [r(d), r((H + 2 * Hkv) * D, d), None, None, r(d, H * D), None, None,
                                       None, None, None, None, None, None, None], [1e-6, 0.0], r(D // 2),
                             torch.tensor([S, S]), H, Hkv,
                             [r(B, S + 2, Hkv, D), r(B, S + 2, Hkv, D),
                              torch.ones(B, S + 2, dtype=torch.bool),
                              torch.arange(S + 2).expand(B, S + 2).contiguous()], [S],
                             [torch.tensor([0, 1])], [], [], [], 16.0),
                            (r(B, d), [r(d), r((H + 2 * Hkv) * D, d), None, None, r(d, H * D), None, None,
                                       None, None, None, None, None, None, None], [1e-6, 0.0], r(D // 2),
                             torch.tensor([S, S]), H, Hkv,
                             [r(B, S + 2, Hkv, D), r(B, S + 2, Hkv, D),
                              torch.ones(B, S + 2, dtype=torch.bool),
                              torch.arange(S + 2).expand(B, S + 2).contiguous()], [S],
                             [torch.tensor([0, 1])], [r(B, H, D, D)], [r(B, H, D, D)], [3], 16.0)],
        "attn_stack_verify": [(r(3, d), [r(d), r((H + 2 * Hkv) * D, d), None, None, r(d, H * D), None, None,
                                         r(d), r(2 * F, d), None, None, r(d, F), None, None], [1e-6, 1e-6],
                               r(D // 2), torch.tensor([S, S + 1, S + 2]), H, Hkv,
                               [r(1, S + 4, Hkv, D), r(1, S + 4, Hkv, D),
                                torch.ones(1, S + 4, dtype=torch.bool), torch.arange(S + 4)[None].clone()],
                               [S])],
        "moe_step": [(r(B, d), r(d), 1e-6, r(3, d), r(3, d, 2 * F), r(3, F, d), None, None, 2, True),
                     (r(B, d), r(d), 1e-6, r(3, d), r(3, d, 2 * F), r(3, F, d), r(2 * F, d), r(d, F), 1,
                      False)],
    }


def _delta_backward_samples(r) -> dict[str, list[tuple]]:
    """delta_chunk_backward's arguments: the tensors its forward saved (plain and gated)."""
    G, N, C, dk, dv = 2, 3, 8, 4, 5
    out = []
    for gated in (False, True):
        q, k, v, beta = r(G * N, C, dk), r(G * N, C, dk) / 3, r(G * N, C, dv), torch.rand(G * N, C)
        g = -torch.rand(G * N, C) if gated else None
        fwd = torch.ops.looplm.delta_chunk_forward(q, k, v, beta, g, r(G, dk, dv), N, 0.5,
                                                   tile_rows(q, v))
        out.append((r(G * N, C, dv), r(G, dk, dv), list(fwd[2:]), N, 0.5, gated, tile_rows(q, v)))
    return {"delta_chunk_backward": out}


CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("name", list(kernel_tracing.FAKE_OPS))
def test_fake_implementation_matches_the_kernel(name):
    op = getattr(torch.ops.looplm, name).default
    for args in _samples()[name]:
        torch.library.opcheck(op, args, test_utils=CHECKS)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_chunk_op_equals_the_autograd_function(gated):
    g = torch.Generator().manual_seed(0)
    G, N, C, dk, dv = 2, 3, 8, 4, 5
    q, k = torch.randn(G * N, C, dk, generator=g), torch.randn(G * N, C, dk, generator=g) / 3
    v, beta = torch.randn(G * N, C, dv, generator=g), torch.rand(G * N, C, generator=g)
    gg = -torch.rand(G * N, C, generator=g) if gated else None
    s0 = torch.randn(G, dk, dv, generator=g)
    args = (q, k, v, beta, gg, s0, N, 0.5, tile_rows(q, v))
    o, final = kernel_tracing.delta_chunk(*args)
    want_o, want_final = DeltaChunkFn.apply(q, k, v, beta, gg, s0, N, 0.5)
    torch.testing.assert_close(o, want_o)
    torch.testing.assert_close(final, want_final)
    torch.library.opcheck(kernel_tracing.delta_chunk, args, test_utils=("test_schema", "test_faketensor"))
