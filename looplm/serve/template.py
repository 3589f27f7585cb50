"""Chat messages -> the prompt text a model continues, and the text that ends its turn.

A tokenizer that knows its model's chat template (``apply_chat_template(messages) -> str``)
renders it; otherwise the ChatML layout (``<|im_start|>role\\ncontent<|im_end|>\\n``, then
``<|im_start|>assistant\\n``), which looplm's own tokenizers have no template for, is used, and
``<|im_end|>`` is a stop string.
"""

from __future__ import annotations

from typing import Any

END_OF_TURN = "<|im_end|>"


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[str]]:
    """``messages`` (``role``, ``content``) -> (prompt text ending where the assistant's reply
    starts, stop strings that end the reply)."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if callable(apply):
        return apply(messages), list(getattr(tokenizer, "chat_stop", ()) or ())
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{END_OF_TURN}\n" for m in messages)
    return text + "<|im_start|>assistant\n", [END_OF_TURN]
