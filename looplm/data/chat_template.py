"""Chat templates: a model's Jinja template (as in its tokenizer_config.json or GGUF metadata)
rendered over a list of messages, the way transformers' ``apply_chat_template`` renders it.

Rendered in jinja2's sandbox (templates come from model files: untrusted) with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
does not escape HTML, and the globals ``raise_exception`` and ``strftime_now``; the variables are
``messages``, ``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from looplm.errors import ConfigError


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 comes with the gguf extra and transformers
        raise ConfigError("chat templates need jinja2: pip install 'looplm[gguf]'") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as err:
        raise ConfigError(f"the model's chat template does not compile: {err}") from None


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **special_tokens: Any,
) -> str:
    """``template`` rendered over ``messages`` (``[{"role": ..., "content": ...}, ...]``);
    ``add_generation_prompt`` appends the opening of the assistant's turn; ``special_tokens``
    (``bos_token="<s>"``, ...) are template variables. ConfigError for a bad message list or a
    template that raises."""
    import jinja2

    if not isinstance(messages, Sequence) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ConfigError("messages must be a list of {'role': ..., 'content': ...} dicts")
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as err:
        raise ConfigError(f"the model's chat template failed: {err}") from None
