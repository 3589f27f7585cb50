"""Every registered mixer is covered by the equivalence tests, and the registry is what the
model, the config and the CLI choices read.

Coverage is read from pytest's own collection of the test files (a subprocess), so a mixer
added to the registry but left out of a test's parameters, or an op family without a test that
checks its forms against each other, fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.bench import ops as bench_ops
from looplm.errors import ConfigError
from looplm.layers.mixers import MIXERS, build_mixer, mixer_spec
from looplm.model import CHOICES, LoopConfig, LoopLM
from looplm.ops.delta_rule import delta_chunk
from looplm.ops.linear_attn import decay_chunk

ROOT = Path(__file__).resolve().parents[1]
# per mixer: full forward == step-by-step decoding (whole model; one mixer layer)
STEP_TESTS = ["tests/model/test_decode.py::test_decode_equals_forward",
              "tests/layers/test_mixers.py::test_full_equals_prefill_then_decode"]
# per op family: its step / recurrent, parallel and chunk forms agree
FORM_TESTS = {
    "attention": "tests/ops/test_attention.py::test_gqa_matches_reference_with_cache_and_mask",
    "decay": "tests/ops/test_linear_attn.py::test_forms_agree_with_recurrent",
    "delta": "tests/ops/test_delta_rule.py::test_forms_agree",
}


@pytest.fixture(scope="module")
def collected() -> list[str]:
    files = sorted({t.split("::")[0] for t in [*STEP_TESTS, *FORM_TESTS.values()]})
    out = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q", *files],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


@pytest.mark.parametrize("test", STEP_TESTS)
def test_every_mixer_is_decoded_step_by_step(test: str, collected: list[str]) -> None:
    params = {m.group(1) for t in collected if (m := re.match(re.escape(test) + r"\[(.*)\]$", t))}
    missing = [name for name in MIXERS if not any(re.search(rf"(^|-){name}(-|$)", p) for p in params)]
    assert not missing, f"{test} does not run {missing}"


def test_every_op_family_has_a_form_equivalence_test(collected: list[str]) -> None:
    families = {spec.op for spec in MIXERS.values()}
    assert families <= set(FORM_TESTS), f"no form test named for {families - set(FORM_TESTS)}"
    for family in families:
        assert any(t.split("[")[0] == FORM_TESTS[family] for t in collected), FORM_TESTS[family]


def test_the_registry_is_what_config_and_model_read() -> None:
    assert CHOICES["mixer"] == tuple(MIXERS)
    model = LoopLM(LoopConfig(vocab_size=32, d_model=32, n_heads=2, n_core=2, mixer="gla", attn_every=2))
    kinds = [(type(b.mixer), b.is_attention) for b in model.core]
    assert kinds == [(MIXERS["gla"].cls, False), (MIXERS["attention"].cls, True)]


def test_unknown_mixer_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="gated_deltanet"):
        mixer_spec("mamba")
    with pytest.raises(ConfigError, match="mixer="):
        LoopConfig(mixer="mamba")
    with pytest.raises(ConfigError, match="bad option"):
        build_mixer("gla", 32, 2, nonsense=1)


@pytest.mark.parametrize("name", MIXERS)
@given(tokens=st.integers(1, 9), batch=st.integers(1, 3))
@settings(max_examples=5, deadline=None)
def test_state_size_formula_equals_the_state(name: str, tokens: int, batch: int) -> None:
    """``MixerSpec.state_numel`` counts what a prefill of ``tokens`` tokens leaves per row."""
    spec = mixer_spec(name)
    mixer = build_mixer(name, 32, 4, **spec.options(LoopConfig(d_model=32, n_heads=4, n_kv_heads=2)))
    with torch.no_grad():
        _, state = mixer(torch.randn(batch, tokens, 32), mixer.init_state(batch))
    if spec.kv_cache:
        tensors = [state.k, state.v]
    elif hasattr(state, "memories"):  # a mixture of memories: each memory's conv tail and state
        tensors = [t for s in state.memories for t in (s.conv, s.ssm)]
    elif hasattr(state, "conv"):
        tensors = [state.conv, state.ssm]
    else:  # linearised attention: its state and the keys inside its window, if any
        tensors = [state.ssm, *([] if state.window is None else [state.window.k, state.window.v])]
    assert sum(t.numel() for t in tensors) == batch * spec.state_numel(mixer, tokens)


def test_bench_ops_runs_the_registry() -> None:
    """``looplm bench ops`` times every registered mixer's op fed the gate its entry names."""
    forms = {(s.op, s.gate) for s in MIXERS.values() if not s.kv_cache}
    assert {(MIXERS[n].op, MIXERS[n].gate) for n in bench_ops.FIXED_STATE} == forms
    assert len(bench_ops.FIXED_STATE) == len(forms)
    assert set(bench_ops.MIXERS) == {*bench_ops.FIXED_STATE, "attention", bench_ops.PEER}
    x = bench_ops.Inputs.make(1, 8, 2, 4, 4)
    with torch.no_grad():
        for name in bench_ops.FIXED_STATE:
            spec = MIXERS[name]
            g = None if spec.gate is None else getattr(x, bench_ops.GATES[spec.gate])
            if spec.op == "delta":
                want, _ = delta_chunk(x.q, x.k, x.v, x.beta, g, chunk_size=bench_ops.DELTA_CHUNK)
            else:
                want, _ = decay_chunk(x.q, x.k, x.v, g, chunk_size=bench_ops.CHUNK)
            assert torch.equal(bench_ops.RUNNERS[name](x)[0], want), name
