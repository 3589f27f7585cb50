"""The few-row int8 (per row and grouped) / int4 kernel built for an AVX2-only CPU (older AMD EPYCs:
no AVX-512, no VNNI) against its PyTorch reference, rows together equal to rows alone, in a subprocess
that loads only that build."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from looplm.ops import cpp_ext
    from looplm.ops.qlinear import qlinear_reference
    from looplm.quant.formats import make_format, quantize

    src = [cpp_ext._CSRC / "qlinear.cpp"]
    flags = ["-O3", "-mavx2", "-mfma", "-mno-avx512f", "-fopenmp"]
    cpp_ext.build(cpp_ext._name(src, flags, ["-fopenmp"]), src, flags, ["-fopenmp"])
    torch.manual_seed(0)
    for fmt, group, k in [("int8", None, 576), ("int8", 32, 576), ("int8", 64, 192), ("int4", 32, 576),
                          ("int4", 64, 1536), ("int4", 32, 96), ("int4", 128, 384)]:
        for rows in (1, 3):
            w, x = torch.randn(37, k), torch.randn(rows, k)
            q = quantize(w, make_format(fmt, group_size=group))
            parts = [q["q"], q["scale"]] if fmt == "int8" else [q["packed"], q["scale"], q["offset"]]
            got, want = torch.ops.looplm.qlinear(x, parts), qlinear_reference(x, parts)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            alone = torch.cat([torch.ops.looplm.qlinear(x[t:t + 1], parts) for t in range(rows)])
            assert torch.equal(got, alone), (fmt, group, k)  # rows taken together: each row's own result
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs a C++ compiler for x86-64")
def test_avx2_build_of_the_quantised_kernel_matches_the_reference(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
