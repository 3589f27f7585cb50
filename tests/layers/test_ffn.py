"""SwiGLU and MoE: dense equivalence, routing losses, zero-computation experts, gradients, errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import looplm.layers.ffn as ffn_module
from looplm.errors import ConfigError
from looplm.layers.ffn import SwiGLU, swiglu
from looplm.layers.moe import MoE
from tests.threads import torch_threads

D, HID = 8, 12


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swiglu_matches_formula():
    ffn = SwiGLU(D, HID)
    x = torch.randn(3, 5, D)
    wg, wu = ffn.w_in.weight[:HID], ffn.w_in.weight[HID:]
    y, aux = ffn(x)
    close(y, (F.silu(x @ wg.T) * (x @ wu.T)) @ ffn.w_out.weight.T)
    assert aux == {}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("one_row_tiles", [False, True])
def test_swiglu_activation_backward_matches_autograd(weighted, one_row_tiles, monkeypatch):
    if one_row_tiles:  # the tile loop as it runs on large inputs
        monkeypatch.setattr(ffn_module, "_TILE", 1)
    h = torch.randn(3, 4, 2 * 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = (h, w) if weighted else (h,)

    def ref(h, w=None):
        g, u = h.chunk(2, -1)
        return F.silu(g) * u * (1 if w is None else w[..., None])

    close(swiglu(*inputs), ref(*inputs))
    gy = torch.randn(3, 4, 5, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(swiglu(*inputs), inputs, gy),
                         torch.autograd.grad(ref(*inputs), inputs, gy)):
        close(got, want)
    assert torch.autograd.gradcheck(swiglu, inputs)


def test_one_expert_top1_equals_dense_swiglu():
    dense, moe = SwiGLU(D, HID), MoE(D, HID, n_experts=1, top_k=1)
    with torch.no_grad():
        moe.w_in[0].copy_(dense.w_in.weight.T)
        moe.w_out[0].copy_(dense.w_out.weight.T)
    x = torch.randn(2, 7, D)
    y, aux = moe(x)
    close(y, dense(x)[0])
    close(aux["balance_loss"], torch.tensor(1.0))
    close(aux["load"], torch.tensor([1.0]))


@given(N=st.integers(1, 40), E=st.integers(1, 4), kinds=st.tuples(*[st.integers(0, 2)] * 3),
       k=st.integers(1, 3), renorm=st.booleans(), seed=st.integers(0, 1000))
def test_matches_per_token_reference(N, E, kinds, k, renorm, seed):
    """Dispatch by sorting equals running every token through its chosen experts one by one."""
    torch.manual_seed(seed)
    zero, copy, const = kinds
    k = min(k, E + zero + copy + const)
    moe = MoE(D, HID, n_experts=E, top_k=k, renormalize=renorm, zero_experts=zero, copy_experts=copy,
              constant_experts=const)
    if const:
        torch.nn.init.normal_(moe.const_w)
    x = torch.randn(N, D)
    y, aux = moe(x)
    p = moe.router(x).softmax(-1)
    w, idx = p.topk(k, -1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros(N, D)
    for n in range(N):
        for j in range(k):
            e = int(idx[n, j])
            if e < E:
                g, u = (x[n] @ moe.w_in[e]).chunk(2)
                ref[n] += w[n, j] * ((F.silu(g) * u) @ moe.w_out[e])
            elif e >= E + zero + copy:
                c = e - E - zero - copy
                a = (x[n] @ moe.const_w[c]).softmax(-1)
                ref[n] += w[n, j] * (a[0] * x[n] + a[1] * moe.const_v[c])
            elif e >= E + zero:
                ref[n] += w[n, j] * x[n]
    close(y, ref)
    # the form torch.compile traces (every expert on every token, gate 0 where unchosen): the same
    close(moe.every_expert(x, w, idx, *moe._projections()), ref)
    close(aux["load"], torch.bincount(idx.flatten(), minlength=moe.n_total) / (N * k))
    close(aux["balance_loss"], moe.n_total * (aux["load"] * p.mean(0)).sum())


def test_balance_loss_one_at_uniform_larger_when_skewed():
    moe = MoE(D, HID, n_experts=4, top_k=1)
    x = torch.randn(64, D)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities
    close(moe(x)[1]["balance_loss"], torch.tensor(1.0))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 5 * x.mean(0) / x.mean(0).square().sum()  # favour expert 0
    aux = moe(x)[1]
    assert aux["balance_loss"] > 1.5
    assert aux["load"][0] > 0.5
    close(aux["z_loss"], torch.logsumexp(moe.router(x), -1).square().mean())


def test_zero_copy_constant_experts():
    moe = MoE(D, HID, n_experts=1, top_k=1, zero_experts=1, copy_experts=1, constant_experts=1)
    x = torch.randn(6, D)
    for e, expect in ((1, torch.zeros_like(x)), (2, x)):
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[e, 0] = 1e4  # route token n by sign of x[n, 0]
        y, aux = moe(x)
        routed = x[:, 0] > 0
        p = moe.router(x).softmax(-1)[:, e]
        close(y[routed], (expect * p[:, None])[routed])
        assert aux["load"].shape == (4,)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3, 0] = 1e4
        moe.const_w.normal_()
    y, _ = moe(x)
    a = (x @ moe.const_w[0]).softmax(-1)
    const = a[:, :1] * x + a[:, 1:] * moe.const_v[0]
    routed = x[:, 0] > 0
    close(y[routed], (const * moe.router(x).softmax(-1)[:, 3:])[routed])


def test_shared_expert_and_gradients_reach_router():
    moe = MoE(D, HID, n_experts=3, top_k=2, shared_hidden=HID, constant_experts=1)
    x = torch.randn(10, D, requires_grad=True)
    y, aux = moe(x)
    (y.square().sum() + aux["balance_loss"] + aux["z_loss"]).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.shared.w_in.weight.grad.abs().sum() > 0
    assert moe.w_in.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_empty_input():
    y, aux = MoE(D, HID, n_experts=2)(torch.zeros(0, D))
    assert y.shape == (0, D) and aux["balance_loss"] == 0 and aux["load"].shape == (2,)


@pytest.mark.parametrize("kw", [dict(n_experts=2, top_k=3), dict(n_experts=0, top_k=1),
                                dict(n_experts=2, top_k=0), dict(n_experts=2, zero_experts=-1)])
def test_bad_configs_raise(kw):
    with pytest.raises(ConfigError):
        MoE(D, HID, **kw)


def _dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the top-k gates (zero elsewhere); the router
    runs in float32 as in MoE."""
    p = moe.router(x).float().softmax(-1)
    w, idx = p.topk(moe.top_k, -1)
    if moe.renormalize:
        w = w / w.sum(-1, keepdim=True)
    gates = torch.zeros_like(p).scatter(1, idx, w).to(x.dtype)  # [N, E_total]
    g, u = torch.einsum("nd,edh->enh", x, moe.w_in).chunk(2, -1)
    outs = list(torch.einsum("enh,ehd->end", F.silu(g) * u, moe.w_out).unbind(0))
    zero, copy, const = moe.kinds
    outs += [torch.zeros_like(x)] * zero + [x] * copy
    for c in range(const):
        a = (x @ moe.const_w[c]).softmax(-1)
        outs.append(a[:, :1] * x + a[:, 1:] * moe.const_v[c])
    y = (torch.stack(outs, 1) * gates[..., None]).sum(1)
    return y if moe.shared is None else y + moe.shared(x)[0]


@given(N=st.integers(0, 30), E=st.integers(1, 3), kinds=st.tuples(*[st.integers(0, 1)] * 3),
       k=st.integers(1, 3), shared=st.booleans(), renorm=st.booleans(), seed=st.integers(0, 1000))
def test_gradients_match_dense_reference(N, E, kinds, k, shared, renorm, seed):
    """Sorted dispatch (gather, split, index_add) has the gradients of the all-experts computation."""
    torch.manual_seed(seed)
    zero, copy, const = kinds
    k = min(k, E + sum(kinds))
    moe = MoE(D, HID, n_experts=E, top_k=k, renormalize=renorm, shared_hidden=HID if shared else 0,
              zero_experts=zero, copy_experts=copy, constant_experts=const).double()
    if const:
        torch.nn.init.normal_(moe.const_w)
    x = torch.randn(N, D, dtype=torch.double, requires_grad=True)
    cot = torch.randn(N, D, dtype=torch.double)
    grads = []
    for fn in (lambda t: moe(t)[0], lambda t: _dense_reference(moe, t)):
        params = [x, *moe.parameters()]
        loss = (fn(x) * cot).sum() + 0 * x.sum()  # keeps a graph when every slot is a zero expert
        out = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, out)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.skipif(not ffn_module.cpp_ext.available(), reason="no C++ kernel built here")
@given(rows=st.integers(1, 40), hidden=st.sampled_from([1, 5, 16, 17, 48, 100]), weighted=st.booleans(),
       threads=st.sampled_from([1, 2]))
def test_swiglu_kernel_float32_matches_float64_formula(rows, hidden, weighted, threads):
    g = torch.Generator().manual_seed(rows * 100 + hidden)
    h = (2 * torch.randn(rows, 2 * hidden, generator=g)).requires_grad_()
    w = torch.rand(rows, generator=g).requires_grad_() if weighted else None
    gy = torch.randn(rows, hidden, generator=g)
    with torch_threads(threads):
        y = swiglu(h, w)
        assert type(y.grad_fn).__name__ == "_SwiGLUKernelBackward"
        grads = torch.autograd.grad(y, (h, w) if weighted else (h,), gy)
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if weighted else None
    gate, up = h64.chunk(2, dim=-1)
    ref = F.silu(gate) * up * (w64[:, None] if weighted else 1)
    want = torch.autograd.grad(ref, (h64, w64) if weighted else (h64,), gy.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5 * (1 + exp.abs().max().item()))
    with torch.no_grad():  # the untracked path runs the same kernel
        torch.testing.assert_close(swiglu(h, w), y)


@pytest.mark.skipif(not ffn_module.cpp_ext.available(), reason="no C++ kernel built here")
def test_swiglu_kernel_gives_the_same_bits_on_any_thread_count():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 2 * 40, generator=g, requires_grad=True)
    w = torch.rand(300, generator=g, requires_grad=True)
    gy = torch.randn(300, 40, generator=g)
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            y = swiglu(h, w)
            results.append([y, *torch.autograd.grad(y, (h, w), gy)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("fmt", ["int4", "int8", "float32"])
def test_swiglu_runs_its_product_and_activation_as_one_kernel_on_amx_rows(fmt, monkeypatch):
    """From bf16_rows() rows on (a prompt's forward), an int8 / int4 w_in, or a float32 one inside
    bf16_products, runs qlinear_swiglu: the same floats as its product followed by the activation;
    fewer rows take the product, then the activation."""
    from looplm.ops import cpp_ext
    from looplm.ops.linear import bf16_products
    from looplm.ops.qlinear import bf16_rows
    from looplm.quant.formats import make_format
    from looplm.quant.linear import QuantLinear

    if not cpp_ext.available() or not bf16_rows():
        pytest.skip("no AMX bfloat16 matrix product in this build or CPU")
    torch.manual_seed(0)
    ffn = SwiGLU(64, 80)
    if fmt != "float32":
        ffn.w_in = QuantLinear.from_linear(ffn.w_in, make_format(fmt, 32))
    fused = []
    real = ffn_module.qlinear_swiglu
    monkeypatch.setattr(ffn_module, "qlinear_swiglu", lambda x, p: fused.append(x.shape) or real(x, p))
    for rows in (bf16_rows() - 1, bf16_rows() + 5):
        x = torch.randn(rows, 64)
        with torch.no_grad(), bf16_products(fmt == "float32"):
            y, _ = ffn(x)
            want = ffn.w_out(swiglu(ffn.w_in(x)))
        assert torch.equal(y, want)
    assert fused == [(bf16_rows() + 5, 64)]
