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


def _ref_q4_k(block: np.ndarray) -> np.ndarray:
    """ggml's Q4_K block (256 values, 144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins
    for 8 sub-blocks of 32, 128 bytes of 4-bit codes; value = d * scale * q - dmin * min."""
    d, dmin = (np.frombuffer(block[i : i + 2].tobytes(), np.float16)[0].astype(np.float32) for i in (0, 2))
    s, qs = block[4:16].astype(np.int32), block[16:144].astype(np.int32)
    sc = [s[j] & 63 if j < 4 else (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4) for j in range(8)]
    mn = [s[j + 4] & 63 if j < 4 else (s[j + 4] >> 4) | ((s[j] >> 6) << 4) for j in range(8)]
    out = []
    for i in range(4):  # 64 values per 32 bytes: low nibbles, then high nibbles
        q = qs[32 * i : 32 * (i + 1)]
        out += [
            d * sc[2 * i] * (q & 0xF) - dmin * mn[2 * i],
            d * sc[2 * i + 1] * (q >> 4) - dmin * mn[2 * i + 1],
        ]
    return np.concatenate(out).astype(np.float32)


def _ref_q6_k(block: np.ndarray) -> np.ndarray:
    """ggml's Q6_K block (256 values, 210 bytes): 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8
    scales (one per 16 values), f16 d; value = d * scale * (q - 32)."""
    ql, qh = block[0:128].astype(np.int32), block[128:192].astype(np.int32)
    sc = block[192:208].view(np.int8).astype(np.int32)
    d = np.frombuffer(block[208:210].tobytes(), np.float16)[0].astype(np.float32)
    y = np.zeros(256, np.float32)
    for half in range(2):
        L, H, S, o = ql[64 * half :], qh[32 * half :], sc[8 * half :], 128 * half
        for l in range(32):
            i = l // 16
            y[o + l] = d * S[i] * (((L[l] & 0xF) | ((H[l] & 3) << 4)) - 32)
            y[o + l + 32] = d * S[i + 2] * (((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32)
            y[o + l + 64] = d * S[i + 4] * (((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32)
            y[o + l + 96] = d * S[i + 6] * (((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32)
    return y


@pytest.mark.parametrize(
    "kind,size,ref,scales",
    [
        ("Q4_K", 144, _ref_q4_k, ((0, 0.01), (2, 0.02))),
        ("Q6_K", 210, _ref_q6_k, ((208, 0.01),)),
    ],
)
def test_k_quants_dequantise_by_the_reference_formula(tmp_path: Path, kind, size, ref, scales):
    """The gguf package cannot quantise K types: crafted blocks (random codes and scales) written as a
    GGUF tensor dequantise, through the importer's path, to ggml's formula exactly."""
    from looplm.pretrained.gguf_file import _dequantize

    blocks = np.random.default_rng(0).integers(0, 256, (6, size), dtype=np.uint8)
    for offset, value in scales:  # the f16 super-block scales: finite, moderate
        blocks[:, offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    qtype = gguf.GGMLQuantizationType[kind]
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_tensor("x.weight", blocks.reshape(3, 2 * size), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors[0]
    got = _dequantize(t, tmp_path).numpy()
    assert got.shape == (3, 512)
    want = np.stack([ref(b) for b in blocks]).reshape(3, 512)
    assert np.array_equal(got, want) and np.abs(want).max() > 1
