"""Generation with a model: cached decoding equals recomputation, batching, seeds, stops, errors."""

import pytest
import torch

from looplm.data.tokenizer import ByteTokenizer
from looplm.generate import decoding_mode, generate, generate_ids
from looplm.model import LoopConfig, LoopLM

TOK = ByteTokenizer()
BASE = dict(vocab_size=TOK.vocab_size, d_model=32, n_heads=2, n_core=2, tie_embeddings=False, init_std=0.2)
CONFIGS = {
    "attention": dict(mixer="attention"),
    "gated_deltanet_moe": dict(mixer="gated_deltanet", ffn="moe", n_experts=4, top_k=2),
    "hybrid_expert_choice": dict(mixer="gla", attn_every=2, n_prelude=1, n_coda=1, sharing="middle_cycle",
                                 n_recursions=3, router="expert_choice"),
    "token_choice": dict(mixer="deltanet", n_recursions=2, router="token_choice"),
}


def make(name: str, **kw) -> LoopLM:
    torch.manual_seed(0)
    return LoopLM(LoopConfig(**{**BASE, **CONFIGS[name], **kw}))


def naive_greedy(model: LoopLM, row: list[int], n: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step (no state)."""
    seq = list(row)
    with torch.no_grad(), decoding_mode(model):
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(row):]


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_cached_greedy_equals_recomputation(name):
    model = make(name)
    rows = [[5, 9, 20, 31, 7, 3, 100], [42, 8], [1, 2, 3, 4]]
    out = generate_ids(model, rows, max_new_tokens=8)
    want = [naive_greedy(model, row, 8) for row in rows]
    assert out == want
    assert len({tuple(o) for o in out}) > 1 and any(len(set(o)) > 1 for o in out)  # not trivial


def test_tensor_input_and_eos_ends_a_row():
    model = make("attention")
    ids = torch.tensor([[5, 9, 20], [1, 2, 3]])
    full = generate_ids(model, ids, max_new_tokens=6)
    eos = full[0][2]
    cut = generate_ids(model, ids, max_new_tokens=6, eos_id=eos)
    assert cut[0] == full[0][:full[0].index(eos) + 1]
    assert cut[1] == (full[1][:full[1].index(eos) + 1] if eos in full[1] else full[1])


def test_seed_reproduces_sampling():
    model = make("gated_deltanet_moe")
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    a = generate_ids(model, [[1, 2, 3]], seed=7, **kw)
    b = generate_ids(model, [[1, 2, 3]], seed=7, **kw)
    c = generate_ids(model, [[1, 2, 3]], seed=8, **kw)
    assert a == b and a != c


def test_stream_pieces_join_to_the_text_and_stop_cuts_it():
    model = make("attention")
    prompts = ["hello", "ab"]
    texts = generate(model, TOK, prompts, max_new_tokens=16)
    steps = list(generate(model, TOK, prompts, max_new_tokens=16, stream=True))
    assert ["".join(col) for col in zip(*steps)] == texts
    assert generate(model, TOK, "hello", max_new_tokens=16) == texts[0]
    single = list(generate(model, TOK, "hello", max_new_tokens=16, stream=True))
    assert "".join(single) == texts[0] and all(single)
    raw = TOK.decode(generate_ids(model, [TOK.encode("hello")], max_new_tokens=16)[0])
    stop = raw[3:5]
    cut = generate(model, TOK, "hello", max_new_tokens=16, stop=[stop])
    assert cut == raw[:raw.index(stop)]
    both = generate(model, TOK, prompts, max_new_tokens=16, stop=[stop])
    assert both[0] == cut and both[1] == (texts[1].split(stop)[0])


def test_zero_new_tokens_and_training_mode_restored():
    model = make("token_choice").train()
    assert generate(model, TOK, "abc", max_new_tokens=0) == ""
    generate(model, TOK, "abc", max_new_tokens=2)
    assert model.training


def test_errors_name_the_problem():
    model = make("attention", max_seq_len=16)
    with pytest.raises(ValueError, match="empty"):
        generate(model, TOK, "", max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        generate(model, TOK, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, TOK, "x" * 14, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, TOK, "x", max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, TOK, "x", max_new_tokens=-1)
    with pytest.raises(TypeError, match="stop"):
        generate(model, TOK, "x", max_new_tokens=4, stop="x")
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, torch.zeros(0, 3, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="outside"):
        generate_ids(model, [[1, 999]], max_new_tokens=1)
    fixed = make("gated_deltanet_moe", max_seq_len=16)  # no attention: no length limit
    assert len(generate_ids(fixed, [[1] * 20], max_new_tokens=4)[0]) == 4
