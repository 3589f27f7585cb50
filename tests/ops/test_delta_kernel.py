"""The C++ delta-rule kernel equals the PyTorch chunk form on any thread count, and falls back cleanly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from looplm.errors import ConfigError
from looplm.ops import cpp_ext, delta_chunkwise, delta_kernel
from looplm.ops.delta_rule import delta_chunk
from tests.threads import torch_threads

from .test_delta_rule import assert_close, make

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


def outputs_and_grads(inputs, gated, use_kernel, **kw):
    q, k, v, beta, g, s0 = (None if x is None else x.detach().clone().requires_grad_() for x in inputs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(delta_chunkwise, "use_kernel", lambda x: use_kernel)
        o, s = delta_chunk(q, k, v, beta, g, initial_state=s0, **kw)
        gen = torch.Generator().manual_seed(5)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
        loss.backward()
    return [o, s] + [x.grad for x in (q, k, v, beta, g, s0) if x is not None]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_equals_pytorch_form_on_any_threads(threads, gated):
    """Groups split unevenly over threads (3 groups, 2 threads), tiles cut through groups, T not a
    multiple of the chunk: the kernel's outputs and all gradients equal the PyTorch form's."""
    inputs = make(1, 45, 3, 8, 6, gated=gated, dtype=torch.float64, seed=1)
    with torch_threads(threads):
        want = outputs_and_grads(inputs, gated, use_kernel=False, chunk_size=4)
        got = outputs_and_grads(inputs, gated, use_kernel=True, chunk_size=4)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, rel=1e-12)


@needs_kernel
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 40), st.integers(1, 3), st.sampled_from([4, 8]),
                    st.sampled_from([4, 6])),
    gated=st.booleans(),
    chunk=st.sampled_from([4, 8, 16]),
)
def test_kernel_equals_pytorch_form_over_shapes(shape, gated, chunk):
    inputs = make(*shape, gated=gated, dtype=torch.float64, seed=sum(shape))
    want = outputs_and_grads(inputs, gated, use_kernel=False, chunk_size=chunk)
    got = outputs_and_grads(inputs, gated, use_kernel=True, chunk_size=chunk)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, rel=1e-12)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LOOPLM_NO_CPP_EXT", "1")
    monkeypatch.setattr(cpp_ext, "_loaded", {})
    assert not cpp_ext.available()
    assert not delta_kernel.use_kernel(torch.zeros(1))


@pytest.mark.parametrize("env, want", [
    ({}, "cpp"), ({"LOOPLM_KERNELS": "torch"}, "torch"), ({"LOOPLM_KERNELS": "cpp"}, "cpp"),
    ({"LOOPLM_KERNELS": "ops"}, "ops"),
    ({"LOOPLM_NO_CPP_EXT": "1"}, "torch"), ({"LOOPLM_KERNELS": "CPP", "LOOPLM_NO_CPP_EXT": "0"}, "cpp"),
])
def test_one_kernel_switch(env, want, monkeypatch):
    for name in ("LOOPLM_KERNELS", "LOOPLM_NO_CPP_EXT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cpp_ext.kernel_setting() == want
    if want == "torch":
        monkeypatch.setattr(cpp_ext, "_loaded", {})
        assert not cpp_ext.available()


def test_unknown_kernel_setting_is_a_config_error(monkeypatch):
    monkeypatch.setenv("LOOPLM_KERNELS", "cuda")
    monkeypatch.setattr(cpp_ext, "_loaded", {})
    with pytest.raises(ConfigError, match="cpp, ops, torch"):
        cpp_ext.available()


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    """A kernel that cannot be built (here: a source that does not compile) gives one warning, and
    the chunk form still runs (in PyTorch) with correct results."""
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.delenv("LOOPLM_NO_CPP_EXT", raising=False)
    monkeypatch.setattr(cpp_ext, "SOURCES", [bad])
    monkeypatch.setattr(cpp_ext, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="C\\+\\+ kernels are unavailable"):
        assert not cpp_ext.available()
    q, k, v, beta, g, _ = make(1, 9, 1, 4, 4, gated=True)
    o, _ = delta_chunk(q, k, v, beta, g, chunk_size=4)
    assert torch.isfinite(o).all()
