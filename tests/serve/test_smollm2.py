"""The real SmolLM2-135M-Instruct behind the server (skipped unless ``looplm pull smollm2`` has
cached it): its own chat template through the openai client, greedy and streamed."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("gguf")
openai = pytest.importorskip("openai")

from looplm.checkpoint import load_model  # noqa: E402
from looplm.data.tokenizer import load_tokenizer  # noqa: E402
from looplm.pretrained.convert import import_checkpoint  # noqa: E402
from looplm.pretrained.pull import cached_model_path  # noqa: E402
from looplm.serve.api import create_app  # noqa: E402
from looplm.serve.engine import Engine  # noqa: E402
from tests.serve.util import serve  # noqa: E402


@pytest.mark.slow
def test_smollm2_chat_over_http(tmp_path):
    path = cached_model_path("smollm2")
    if not path.exists():
        pytest.skip(f"SmolLM2 is not in the cache ({path}); `looplm pull smollm2` fetches it")
    import_checkpoint(path, tmp_path / "smollm2")
    model, tok = load_model(tmp_path / "smollm2"), load_tokenizer(tmp_path / "smollm2")
    with serve(create_app(Engine(model, tok, max_batch=4), model_id="smollm2")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        ask = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smollm2", messages=ask, max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        streamed = c.chat.completions.create(model="smollm2", messages=ask, max_tokens=24, temperature=0,
                                             stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == r.choices[0].message.content
