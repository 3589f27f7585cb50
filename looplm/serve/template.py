"""Chat messages -> the prompt text a model continues, and the text that ends its turn.

A tokenizer that carries its model's chat template (an imported model's
``PretrainedTokenizer``: ``chat_template`` and ``apply_chat_template(messages)``) renders it; the
turn then ends with the model's end-of-text token. looplm's own tokenizers have no template:
they get the ChatML layout (``<|im_start|>role\\ncontent<|im_end|>\\n``, then
``<|im_start|>assistant\\n``) with ``<|im_end|>`` as a stop string.
"""

from __future__ import annotations

from typing import Any

END_OF_TURN = "<|im_end|>"


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[str]]:
    """``messages`` (``role``, ``content``) -> (prompt text ending where the assistant's reply
    starts, stop strings that end the reply)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages), []
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{END_OF_TURN}\n" for m in messages)
    return text + "<|im_start|>assistant\n", [END_OF_TURN]
