"""GGUF tensors: the q/k permutation round trip and each tensor type's dequantisation error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from looplm.pretrained.gguf_file import permute_qk, unpermute_qk  # noqa: E402


@given(heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_permutation_round_trip_is_exact(heads, half, cols):
    w = torch.randn(heads * 2 * half, cols)
    p = permute_qk(w, heads)
    assert torch.equal(unpermute_qk(p, heads), w)
    # llama.cpp's pairs: row 2i of a head is the half-layout's row i, row 2i+1 its row i + D/2
    D = 2 * half
    for h in range(heads):
        for i in range(half):
            assert torch.equal(p[h * D + 2 * i], w[h * D + i])
            assert torch.equal(p[h * D + 2 * i + 1], w[h * D + half + i])


# worst-case error of each type, as a fraction of a block's largest magnitude (Q*_1: its range)
BOUNDS = {
    "F16": 1e-3,
    "BF16": 8e-3,
    "Q8_0": 0.5 / 127 + 2e-3,
    "Q4_0": 1 / 8 + 2e-3,
    "Q4_1": 0.5 / 15 + 2e-3,
    "Q5_0": 1 / 16 + 2e-3,
    "Q5_1": 0.5 / 31 + 2e-3,
}


@pytest.mark.parametrize("kind", sorted(BOUNDS))
def test_each_type_dequantises_within_its_error(tmp_path: Path, kind):
    from looplm.pretrained.gguf_file import _dequantize
    from tests.pretrained.synthetic import add_tensor

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_tensor(writer, "x.weight", w, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    assert t.tensor_type.name == kind
    got = _dequantize(t, tmp_path).numpy()
    assert got.shape == w.shape
    blocks = w.reshape(8, -1, 32)
    err = np.abs(got.reshape(blocks.shape) - blocks).max(-1)
    scale = (blocks.max(-1) - blocks.min(-1)) if kind.endswith("_1") else np.abs(blocks).max(-1)
    assert (err <= BOUNDS[kind] * scale + 1e-6).all()
    assert err.max() > 0 or kind == "F16"
