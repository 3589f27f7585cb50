"""PTQ on LoopLM: module selection, quantised checkpoints through load_model, bad metadata."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from looplm.checkpoint import load_model, save_model
from looplm.cli import main
from looplm.errors import CheckpointError
from looplm.generate import generate_ids
from looplm.layers.linear import Linear
from looplm.model import LoopConfig, LoopLM
from looplm.quant.formats import FORMATS, make_format
from looplm.quant.linear import QuantEmbedding, QuantLinear
from looplm.quant.ptq import quantize_model


def tiny(**kw) -> LoopLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, d_model=64, n_heads=2, n_core=2, n_recursions=2, mixer="gla", attn_every=2)
    return LoopLM(LoopConfig(**{**cfg, **kw})).eval()


def test_quantize_model_replaces_linears_keeps_embeddings_and_small_projections():
    model = quantize_model(tiny(tie_embeddings=False), "int4", group_size=32)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["embed"] is nn.Embedding and kinds["head"] is Linear  # the head stays in float
    quantised = model.quantization["modules"]
    assert quantised and all(kinds[n] is QuantLinear for n in quantised)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"
            and min(m.in_features, m.out_features) >= 16 and m.in_features % 32 == 0]
    assert not left
    out = model(torch.randint(0, 64, (2, 8)))
    assert torch.isfinite(out.logits).all()


def test_tied_embedding_is_quantised_only_when_neither_end_is_kept():
    assert "embed" not in quantize_model(tiny(), "int8", keep_embeddings=False).quantization["modules"]
    model = quantize_model(tiny(), "int8", keep_embeddings=False, keep_head=False)
    assert isinstance(model.embed, QuantEmbedding)
    assert torch.isfinite(model(torch.randint(0, 64, (1, 5))).logits).all()


@pytest.mark.parametrize("name", FORMATS)
def test_quantised_checkpoint_loads_through_load_model_and_generates(tmp_path, name):
    ids = torch.randint(0, 64, (2, 6))
    ref = tiny()
    float_logits = ref(ids).logits
    model = quantize_model(ref, name, group_size=32 if name == "int4" else None,
                           keep_embeddings=False, keep_head=False)
    save_model(model, tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert section["format"] == name
    loaded = load_model(tmp_path)
    assert loaded.quantization == model.quantization
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    err = (loaded(ids).logits - float_logits).norm() / float_logits.norm()
    assert err < {"int8": 0.05, "fp8_e4m3": 0.1}.get(name, 0.5)
    new = generate_ids(loaded, ids.tolist(), max_new_tokens=4)
    assert [len(r) for r in new] == [4, 4]


@pytest.mark.parametrize("name", ["int8", "int4", "fp4_mx"])
def test_quantised_weights_take_their_format_bits(tmp_path, name):
    model = tiny(vocab_size=256, d_model=128)
    save_model(model, tmp_path / "f32")
    q = quantize_model(model, name, keep_embeddings=False, keep_head=False)
    n = sum(q.get_submodule(m).rows * q.get_submodule(m).cols for m in q.quantization["modules"])
    save_model(q, tmp_path / "q")
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "q")]
    bits = make_format(name).bits
    assert sizes[0] - sizes[1] == pytest.approx(n * (4 - bits / 8), rel=0.02)


def _edit_section(path, **changes):
    data = json.loads((path / "config.json").read_text())
    data["quantization"].update(changes)
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change, match", [
    ({"format": "int3"}, "format="),
    ({"format": "fp8_e4m3"}, "do not match"),  # int8 tensors read as fp8: dtype mismatch
    ({"group_size": 64}, "do not match"),
    ({"group_size": 128}, "bad .quantization."),
    ({"modules": ["no.such.module"]}, "bad 'quantization'"),
    ({"modules": "layers"}, "bad 'quantization'"),
])
def test_wrong_format_metadata_is_a_checkpoint_error(tmp_path, change, match):
    save_model(quantize_model(tiny(), "int8" if "format" in change else "int4", group_size=None
                              if "format" in change else 32), tmp_path)
    _edit_section(tmp_path, **change)
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path)


def test_missing_section_is_a_checkpoint_error(tmp_path):
    save_model(quantize_model(tiny(), "int8"), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["quantization"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path)


def test_quantised_checkpoint_loads_through_transformers_auto_model(tmp_path):
    from transformers import AutoModelForCausalLM

    import looplm.hf  # noqa: F401  (registers the Auto classes)

    model = quantize_model(tiny(), "int4", group_size=32)
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 6))
    assert isinstance(hf.model.core[0].ffn.w_in, QuantLinear)
    assert torch.equal(hf(ids).logits, model(ids).logits)
    assert hf.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_embedding_format_keeps_the_tied_table_in_its_own_format_through_a_checkpoint(tmp_path):
    ids = torch.randint(0, 64, (2, 6))
    model = quantize_model(tiny(), "int4", group_size=32, keep_embeddings=False, keep_head=False,
                           embedding_format="int8")
    assert isinstance(model.embed, QuantEmbedding) and model.embed.fmt.name == "int8"
    body = [m for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert body and all(m.fmt.name == "int4" and m.fmt.group_size == 32 for m in body)
    overrides = model.quantization["overrides"]
    assert list(overrides) == ["embed"] and overrides["embed"]["format"] == "int8"
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.embed.fmt.name == "int8" and loaded.quantization == model.quantization
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the int8 table is closer to the float one than an int4 table
    ref = tiny().embed.weight
    all4 = quantize_model(tiny(), "int4", group_size=32, keep_embeddings=False, keep_head=False)
    err = {k: (m.embed(torch.arange(64)) - ref).norm() for k, m in (("int8", model), ("int4", all4))}
    assert err["int8"] < err["int4"] / 4


def test_int8_groups_through_a_checkpoint_and_per_row_checkpoints_keep_their_layout(tmp_path):
    """Grouped int8 (body g64, tied table g32) saves, loads and runs equal; a per-row int8
    checkpoint keeps the layout checkpoints always had (scale [out], group_size null), and a
    section whose group size does not fit the stored scales is refused."""
    ids = torch.randint(0, 64, (2, 6))
    model = quantize_model(tiny(), "int8", group_size=64, keep_embeddings=False, keep_head=False,
                           embedding_format="int8", embedding_group_size=32)
    assert model.embed.fmt.group_size == 32 and model.embed.part("scale").shape == (64, 2)
    body = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert body and all(m.fmt.group_size == 64 and m.part("scale").dim() == 2 for m in body)
    save_model(model, tmp_path / "g")
    loaded = load_model(tmp_path / "g")
    assert loaded.quantization == model.quantization
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    per_row = quantize_model(tiny(), "int8")
    save_model(per_row, tmp_path / "r")
    section = json.loads((tmp_path / "r" / "config.json").read_text())["quantization"]
    assert section["format"] == "int8" and section["group_size"] is None
    with safe_open(str(tmp_path / "r" / "model.safetensors"), "pt") as f:
        scales = [f.get_slice(k).get_shape() for k in f.keys() if k.endswith(".scale")]
    assert scales and all(len(shape) == 1 for shape in scales)
    assert torch.equal(load_model(tmp_path / "r")(ids).logits, per_row(ids).logits)
    _edit_section(tmp_path / "r", group_size=32)
    with pytest.raises(CheckpointError, match="bad 'quantization' .* cannot use int8 with group_size=32"):
        load_model(tmp_path / "r")


def test_info_counts_the_bytes_a_quantised_checkpoint_stores(tmp_path, capsys):
    """``looplm info``'s weight bytes are the stored tensors' (codes, scales, float parameters), and
    its per-format counts cover every quantised weight at the format's bits."""
    model = quantize_model(tiny(), "int8", group_size=32, keep_embeddings=False, keep_head=False,
                           embedding_format="int8")
    save_model(model, tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    w = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["weights"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert w["bytes"] == stored
    assert set(w["formats"]) == {"int8 g32", "int8 per row"}
    assert w["formats"]["int8 g32"]["bits"] == 9.0 and w["formats"]["int8 per row"]["weights"] == 64 * 64
    assert w["quantised"] == sum(v["weights"] for v in w["formats"].values())
    assert main(["info", str(tmp_path)]) == 0
    assert "in int8 g32 (9 bits each)" in capsys.readouterr().out


def test_overrides_naming_an_unquantised_module_are_refused(tmp_path):
    model = quantize_model(tiny(), "int8", keep_embeddings=False, keep_head=False, embedding_format="int8")
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization"]["overrides"] = {"not_a_module": {"format": "int8"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_model(tmp_path)
