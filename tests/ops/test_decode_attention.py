"""The C++ decoding attention (``attn_step_out``'s split-K ``attend``) against softmax attention in torch,
for float32 and int8 caches, head dimensions on its AVX-512 chunk kernel (multiples of 64) and off it,
query groups of 1 to 8 heads per key head, and caches padded at the front."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.ops import cpp_ext
from looplm.ops.kv_quant import quantize_rows
from tests.ops.decode_reference import reference
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(D=st.sampled_from([16, 64, 128]), kv_heads=st.sampled_from([1, 2, 3]),
       group=st.sampled_from([1, 2, 3, 4, 5, 8]), S=st.sampled_from([1, 3, 4, 17, 63, 64, 65, 130, 300]),
       batch=st.integers(1, 2), int8=st.booleans(),
       pad=st.integers(0, 70), threads=st.sampled_from([1, 2]))
def test_decoding_attention_equals_softmax_attention(D, kv_heads, group, S, batch, int8, pad, threads):
    torch.manual_seed(D + S + 7 * group)
    H = kv_heads * group
    q = torch.randn(batch, H, D)
    k, v = torch.randn(batch, S, kv_heads, D) * 2, torch.randn(batch, S, kv_heads, D)
    starts = [0] + [min(pad, S - 1)] * (batch - 1)  # the second row padded at the front
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if int8:  # the kernel reads the codes; the reference their dequantised values
        (kq, ks), (vq, vs) = quantize_rows(k, torch.int8), quantize_rows(v, torch.int8)
        k, v, scales = kq.float() * ks, vq.float() * vs, (ks, vs)
        kc, vc = kq, vq
    else:
        kc, vc = k, v
    eye = torch.eye(H * D)
    with torch_threads(threads):
        out = torch.ops.looplm.attn_step_out(torch.zeros(batch, H * D), q, kc, vc, [eye], None, [], [], 1e-6,
                                             torch.tensor(starts), *scales)
    torch.testing.assert_close(out.view(batch, H, D), reference(q, k, v, starts), rtol=1e-4, atol=1e-5)


AVX2_SCRIPT = textwrap.dedent("""
    import torch
    from looplm.ops import cpp_ext
    from looplm.ops.kv_quant import quantize_rows
    from tests.ops.decode_reference import reference

    src = [cpp_ext._CSRC / "attn_step.cpp"]
    flags = ["-O3", "-mavx2", "-mfma", "-mno-avx512f", "-fopenmp"]
    cpp_ext.build(cpp_ext._name(src, flags, ["-fopenmp"]), src, flags, ["-fopenmp"])
    torch.manual_seed(0)
    for D, group, S, int8 in [(32, 1, 5, False), (32, 3, 70, True), (64, 2, 130, False), (64, 5, 64, True),
                              (128, 4, 17, True), (16, 2, 9, True)]:
        Hkv, B = 2, 2
        q, k, v = torch.randn(B, Hkv * group, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
        starts, scales = [0, S // 3], ()
        if int8:
            (kq, ks), (vq, vs) = quantize_rows(k, torch.int8), quantize_rows(v, torch.int8)
            k, v, scales, kc, vc = kq.float() * ks, vq.float() * vs, (ks, vs), kq, vq
        else:
            kc, vc = k, v
        H = Hkv * group
        eye = torch.eye(H * D)
        out = torch.ops.looplm.attn_step_out(torch.zeros(B, H * D), q, kc, vc, [eye], None, [], [], 1e-6,
                                             torch.tensor(starts), *scales)
        torch.testing.assert_close(out.view(B, H, D), reference(q, k, v, starts), rtol=1e-4, atol=1e-5)
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs a C++ compiler for x86-64")
def test_avx2_build_of_the_decoding_attention_equals_softmax_attention(tmp_path):
    """The chunk kernel's 256-bit form (older AMD EPYCs: AVX2, no AVX-512), in a subprocess that loads
    only that build of attn_step.cpp."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", AVX2_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
