"""`looplm bench infer`: the transformers twin is the same model (same logits), and the quick run
writes a row per contender and prompt with positive speeds and the bytes a step reads."""

import json

import pytest
import torch

from looplm.bench.infer import QUICK, llama_twin, looplm_models, weight_bytes
from looplm.cli import main
from looplm.model import LoopConfig, LoopLM


def test_llama_twin_has_the_same_logits():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = LoopLM(LoopConfig(**QUICK)).eval()
    twin = llama_twin(m)
    ids = torch.randint(0, QUICK["vocab_size"], (2, 20))
    with torch.no_grad():
        want, got = m(ids).logits, twin(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()  # summation order, RoPE angles in float32
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_quantised_rows_quantise_the_tied_table_and_read_fewer_bytes():
    m = LoopLM(LoopConfig(**QUICK))
    models = looplm_models(m, ["float32", "int8", "int4"], 32)
    assert type(models["looplm_int4"].embed).__name__ == "QuantEmbedding"
    sizes = [weight_bytes(models[f"looplm_{f}"]) for f in ("float32", "int8", "int4")]
    assert sizes[0] > 3 * sizes[1] / 1.1 and sizes[1] > sizes[2]


def test_quick_run(tmp_path):
    pytest.importorskip("transformers")
    assert main(["bench", "infer", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "infer.json").read_text())
    names = {(r["model"], r["prompt"]) for r in data["rows"]}
    assert names == {(m, p) for m in ("looplm_float32", "looplm_int8", "looplm_int4", "transformers_float32")
                     for p in (8, 24)}
    assert all(r["prefill_tok_s"] > 0 for r in data["rows"])
    assert all(r["bytes_per_token"] > 0 for r in data["rows"] if r["model"].startswith("looplm"))
