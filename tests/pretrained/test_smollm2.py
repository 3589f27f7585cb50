"""Integration: the real SmolLM2-135M-Instruct GGUF (``looplm pull smollm2``), when it is in the
cache, imported by looplm against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from looplm.checkpoint import load_model  # noqa: E402
from looplm.data.tokenizer import load_tokenizer  # noqa: E402
from looplm.generate import generate_ids  # noqa: E402
from looplm.pretrained.convert import import_checkpoint  # noqa: E402
from looplm.pretrained.pull import cached_model_path  # noqa: E402
from tests.pretrained import synthetic as S  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. Within "
    "fifty years presses were running in more than two hundred cities across Europe, and the price of a "
    "book had fallen so far that a scholar could own dozens of volumes instead of a handful of copied "
    "manuscripts. Printers soon",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in '
    "range(n):\n        a, b = b, a + b\n    return a\n\n\ndef is_prime(n):\n    if n < 2:\n"
    "        return False\n",
    "<|im_start|>user\nExplain in two sentences why the sky is blue, and then name three colours that "
    "appear in a sunset and the reason each one appears. Keep the answer short, plain and friendly, as if "
    "you were talking to a curious ten-year-old who has just watched the sun go down over the sea "
    "from a beach.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = cached_model_path("smollm2")
    if not path.is_file():
        pytest.skip(f"SmolLM2 is not in the cache ({path}); `looplm pull smollm2` fetches it")
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    import_checkpoint(path, out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    return load_model(out).eval(), load_tokenizer(out), reference


def test_logits_and_greedy_tokens_match_transformers(smollm2):
    model, tokenizer, reference = smollm2
    rows = [tokenizer.encode(p) for p in PROMPTS]
    assert all(len(r) >= 64 for r in rows)
    S.assert_parity(reference, model, rows)


def test_chat_answer_names_paris(smollm2):
    model, tokenizer, _ = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n") and "SmolLM" in prompt
    new = generate_ids(model, [tokenizer.prompt_ids(prompt)], max_new_tokens=24, eos_id=tokenizer.eos_id)[0]
    assert "Paris" in tokenizer.decode(new)


def test_tokenizer_matches_the_models_own_splitting(smollm2):
    _, tokenizer, _ = smollm2
    ids = tokenizer.encode("In 2024, 12345 people paid $3.50.")
    assert tokenizer.decode(ids) == "In 2024, 12345 people paid $3.50."
    digits = [tokenizer.decode([i]) for i in tokenizer.encode("12345")]
    assert digits == list("12345")  # SmolLM's pre-tokenizer splits numbers into single digits
    assert tokenizer.encode("<|im_start|>") == [1] and tokenizer.eos_id == 2
