"""Loading a quantised checkpoint holds its stored tensors only: no float copy of the weights, no
random initialisation, and no dequantised matrix when decoding starts."""

import subprocess
import sys
import textwrap

import torch

import looplm.quant.linear as quant_linear
from looplm.checkpoint import load_model, save_model
from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import quantize_model

# float32: ~4 x 26M = 105 MB; int4 in groups of 32 (and an int8 table): ~20 MB
CONFIG = dict(vocab_size=8192, d_model=512, n_heads=8, n_kv_heads=2, n_core=8, d_ffn=1536,
              tie_embeddings=True)


def _int4_checkpoint(path) -> None:
    torch.manual_seed(0)
    model = quantize_model(LoopLM(LoopConfig(**CONFIG)), "int4", group_size=32, keep_embeddings=False,
                           keep_head=False, embedding_format="int8")
    save_model(model, path)


def test_loading_an_int4_checkpoint_never_holds_float_weights(tmp_path):
    _int4_checkpoint(tmp_path)
    probe = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        def kb(field):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1])
        from looplm.checkpoint import load_model
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on (not the imports')
        start = kb("VmRSS:")
        model = load_model({str(tmp_path)!r})
        stored = sum(t.numel() * t.element_size() for t in model.state_dict().values()) // 1024
        print(kb("VmHWM:") - start, stored, "torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    grown_kb, stored_kb, dynamo = out.stdout.split()
    float_kb = LoopLM(LoopConfig(**CONFIG)).num_params() * 4 // 1024
    assert int(grown_kb) < int(stored_kb) + float_kb // 4, (grown_kb, stored_kb, float_kb)
    assert dynamo == "False"  # building the model imported no compiler stack (~120 MB resident)


def test_decoding_a_quantised_model_dequantises_no_matrix(tmp_path, monkeypatch):
    _int4_checkpoint(tmp_path)
    reads: list[str] = []
    weight = quant_linear._QuantWeight.weight

    def spy(self):
        reads.append(type(self).__name__)
        return weight.fget(self)

    monkeypatch.setattr(quant_linear._QuantWeight, "weight", property(spy))
    model = load_model(tmp_path).eval()
    ids = torch.randint(0, 8192, (1, 8))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        model(out.logits[:, -1:].argmax(-1), state=out.state)
    assert reads == []
