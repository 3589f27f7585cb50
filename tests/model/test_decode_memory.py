"""Peak memory of int4 decoding (issue target: growth <= 1.5x the int4 weights plus the KV cache):
a model of SmolLM2-135M's shape with random int4 weights (int8 tied embedding/head), loaded in a
fresh interpreter, prefills 1024 tokens and decodes 32."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from looplm.checkpoint import save_model
from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import quantize_model

SMOLLM2 = dict(vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3, n_core=30, d_ffn=1536,
               max_seq_len=2048, tie_embeddings=True)
PROMPT, NEW = 1024, 32
# Resident pages a first prefill adds besides weights and cache, none of them the model's: the code
# of the kernels it runs for the first time (libtorch's MKL/oneDNN paths, ~16 MB of file pages) and
# the thread pools' stacks and buffers.
RUNTIME_MB = 16
# MKL's memory manager keeps the work buffers its products free, for reuse: a cache of MKL's (~26 MB
# after this prefill's attention products, none of it the model's; 0 with it off), which the probes
# leave out so that the peak is the model's and the runtime's pages above
ENV = {**os.environ, "MKL_DISABLE_FAST_MM": "1"}
# a fresh interpreter's start of a probe: kb(field) reads /proc/self/status; 2 threads, kernels built
# (in a fresh clone the first probe may build them, whose peak is not the model's: VmHWM is reset
# through /proc/self/clear_refs after that)
PREAMBLE = textwrap.dedent('''
        import torch
        from pathlib import Path
        from looplm.checkpoint import load_model
        from looplm.generate import iter_tokens
        from looplm.ops import cpp_ext
        def kb(field):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1])
        torch.set_num_threads(2)
        cpp_ext.available()
        Path("/proc/self/clear_refs").write_text("5")
''')


@pytest.fixture(scope="module")
def int4_smollm2(tmp_path_factory):
    path = tmp_path_factory.mktemp("int4_smollm2")
    torch.manual_seed(0)
    model = quantize_model(LoopLM(LoopConfig(**SMOLLM2)), "int4", group_size=32, keep_embeddings=False,
                           keep_head=False, embedding_format="int8")
    save_model(model, path)
    return path


@pytest.mark.slow
def test_int4_decoding_peak_is_weights_and_cache(int4_smollm2):
    probe = PREAMBLE + textwrap.dedent(f"""
        start = kb("VmRSS:")
        model = load_model({str(int4_smollm2)!r})
        ids = torch.randint(0, model.config.vocab_size, (1, {PROMPT})).tolist()
        for _ in iter_tokens(model, ids, max_new_tokens={NEW}):
            pass
        stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        print(kb("VmHWM:") - start, stored // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_kb, weights_kb = map(int, out.stdout.split())
    c = LoopConfig(**SMOLLM2)
    cache_kb = 2 * c.n_core * c.kv_heads * (c.d_model // c.n_heads) * 4 * (PROMPT + NEW) // 1024
    budget_kb = 1.5 * weights_kb + cache_kb + RUNTIME_MB * 1024
    assert grown_kb <= budget_kb, f"peak grew {grown_kb / 1024:.0f} MB > {budget_kb / 1024:.0f} MB"


@pytest.mark.slow
def test_a_generation_peaks_no_higher_after_others(int4_smollm2):
    """bench pretrained's sequence in one process: short generations, then two long ones of the same
    length; the second long one must not raise the peak (memory the first left free in the heap is
    handed back when it ends, so the next one does not grow beside it)."""
    probe = PREAMBLE + textwrap.dedent(f"""
        model = load_model({str(int4_smollm2)!r})
        ids = torch.randint(0, model.config.vocab_size, (1, {PROMPT})).tolist()
        peaks = []
        for n, new in ((8, 3), (32, 128), (32, 128), ({PROMPT}, 128), ({PROMPT}, 128)):
            for _ in iter_tokens(model, [ids[0][:n]], max_new_tokens=new):
                pass
            peaks.append(kb("VmHWM:"))
        print(peaks[-2], peaks[-1])
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    first_kb, second_kb = map(int, out.stdout.split())
    grown_mb = (second_kb - first_kb) / 1024
    assert grown_mb <= 8, f"the second generation raised the peak by {grown_mb:.0f} MB"
