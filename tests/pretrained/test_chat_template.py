"""Chat templates render exactly as transformers' apply_chat_template."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from looplm.data.tokenizer import load_tokenizer  # noqa: E402
from looplm.errors import ConfigError  # noqa: E402
from tests.pretrained import synthetic as S  # noqa: E402

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word."},
]
# Llama 2's style: the bos token, a system prompt folded into the first turn, raise_exception
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.mark.parametrize("template", [S.CHAT_TEMPLATE, LLAMA2_STYLE])
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_three_turns_render_as_transformers(tmp_path: Path, template, system, generation_prompt):
    from looplm.pretrained.convert import import_checkpoint

    S.save_hf_dir(tmp_path / "hf")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    reference.chat_template = template
    reference.bos_token = "<|endoftext|>"
    reference.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out")
    messages = ([{"role": "system", "content": "Be brief."}] if system else []) + CONVERSATION
    want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    got = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert got == want
    # the rendered specials are single ids, as transformers encodes them
    assert tok.encode(got) == reference.encode(got, add_special_tokens=False)


def test_template_errors_are_one_clear_error(tmp_path: Path):
    from looplm.data.chat_template import render_chat

    with pytest.raises(ConfigError, match="roles must alternate"):
        render_chat(LLAMA2_STYLE, CONVERSATION[:1] * 2, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ConfigError, match="does not compile"):
        render_chat("{% for %}", CONVERSATION)
    with pytest.raises(ConfigError, match="list of"):
        render_chat(S.CHAT_TEMPLATE, ["hello"])
