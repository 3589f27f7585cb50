"""The HTTP server through the official ``openai`` client and raw httpx: completions, chat,
streaming, bad input, API keys, the queue limit, disconnects and a burst with malformed requests."""

import asyncio
import json
import time
from functools import partial

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from looplm.generate import generate_ids  # noqa: E402
from looplm.serve.api import create_app  # noqa: E402
from looplm.serve.engine import Engine  # noqa: E402
from looplm.serve.metrics import parse_metrics  # noqa: E402
from looplm.serve.template import render_chat  # noqa: E402
from tests.serve.util import serve, tiny_model, tokenizer  # noqa: E402

# generous timeouts: a loaded machine (or a first call that builds the C++ kernels) is slow
post = partial(httpx.post, timeout=120)
get = partial(httpx.get, timeout=120)


def make_app(name="attention", eos=True, api_key=None, **kw):
    model = tiny_model(name)
    return model, create_app(Engine(model, tokenizer(eos), **kw), model_id="tiny", api_key=api_key)


@pytest.fixture(scope="module")
def server():
    model, app = make_app(max_batch=8)
    with serve(app) as url:
        yield model, url


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=120,
                         **kw)


def greedy_text(model, prompt, n):
    tok = tokenizer()
    ids = generate_ids(model, [tok.encode(prompt)], max_new_tokens=n, eos_id=tok.eos_id)[0]
    return tok.decode([i for i in ids if i != tok.eos_id])


def test_completions_chat_and_models(server):
    model, url = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy_text(model, "def f(x):", 8)
    assert r.usage.prompt_tokens == len("def f(x):") and r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("length", "stop")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ch = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    prompt, _ = render_chat(messages, tokenizer())
    expect = greedy_text(model, prompt, 6).split("<|im_end|>")[0]
    assert ch.choices[0].message.role == "assistant" and ch.choices[0].message.content == expect
    assert ch.usage.prompt_tokens == len(prompt.encode())
    assert get(url + "/health").json()["status"] == "ok"


def test_streaming_equals_the_whole_response(server):
    model, url = server
    c = client(url)
    whole = c.completions.create(model="tiny", prompt="import os\n", max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model="tiny", prompt="import os\n", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=10, temperature=0, stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream]
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=10, temperature=0)
    assert "".join(pieces) == chat.choices[0].message.content
    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": "a", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_logprobs_and_penalties(server):
    """Logprobs through the openai client: one entry per generated token, the greedy token first
    among its alternatives, streamed pieces equal to the whole; penalties change greedy text."""
    model, url = server
    c = client(url)
    r = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    # greedy: no alternative is more likely (byte tokens may share the text "\ufffd" as keys)
    assert all(1 <= len(top) <= 2 and max(top.values()) <= v + 1e-5 for top, v in
               zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens) == r.choices[0].text
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(
        model="tiny", prompt="def f(x):", max_tokens=8, temperature=0, logprobs=2, stream=True) if ch.choices]
    assert [v for s in streamed if s for v in s.token_logprobs] == pytest.approx(lp.token_logprobs)
    messages = [{"role": "user", "content": "hello"}]
    ch = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                   logprobs=True, top_logprobs=3)
    content = ch.choices[0].logprobs.content
    assert len(content) == ch.usage.completion_tokens or ch.choices[0].finish_reason == "stop"
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob
               for e in content)
    plain = c.completions.create(model="tiny", prompt="aaaa", max_tokens=16, temperature=0)
    penal = c.completions.create(model="tiny", prompt="aaaa", max_tokens=16, temperature=0,
                                 frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].logprobs is None and penal.choices[0].text != plain.choices[0].text


def test_seeded_sampling_is_reproducible(server):
    _, url = server
    c = client(url)
    kw = dict(model="tiny", prompt="class ", max_tokens=10, temperature=1.0, top_p=0.95, seed=3)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


BAD = [
    ("not json", "{nope", 400),
    ("a list", "[1, 2]", 400),
    ("no prompt", {"model": "tiny"}, 400),
    ("empty prompt", {"model": "tiny", "prompt": ""}, 400),
    ("empty token list", {"model": "tiny", "prompt": []}, 400),
    ("max_tokens 0", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400),
    ("max_tokens negative", {"model": "tiny", "prompt": "a", "max_tokens": -5}, 400),
    ("max_tokens a string", {"model": "tiny", "prompt": "a", "max_tokens": "ten"}, 400),
    ("max_tokens a float", {"model": "tiny", "prompt": "a", "max_tokens": 2.5}, 400),
    ("temperature negative", {"model": "tiny", "prompt": "a", "temperature": -0.1}, 400),
    ("temperature a string", {"model": "tiny", "prompt": "a", "temperature": "hot"}, 400),
    ("top_p 0", {"model": "tiny", "prompt": "a", "top_p": 0}, 400),
    ("n 2", {"model": "tiny", "prompt": "a", "n": 2}, 400),
    ("stream not a bool", {"model": "tiny", "prompt": "a", "stream": "yes"}, 400),
    ("token id out of range", {"model": "tiny", "prompt": [1, 100000]}, 400),
    ("beyond the context", {"model": "tiny", "prompt": "a" * 200, "max_tokens": 100}, 400),
    ("seed a string", {"model": "tiny", "prompt": "a", "seed": "x"}, 400),
    ("stop a number", {"model": "tiny", "prompt": "a", "stop": 3}, 400),
    ("presence_penalty 3", {"model": "tiny", "prompt": "a", "presence_penalty": 3}, 400),
    ("frequency_penalty a string", {"model": "tiny", "prompt": "a", "frequency_penalty": "lots"}, 400),
    ("min_p above 1", {"model": "tiny", "prompt": "a", "min_p": 1.5}, 400),
    ("logprobs 6", {"model": "tiny", "prompt": "a", "logprobs": 6}, 400),
]


@pytest.mark.parametrize("what,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(server, what, body, status):
    _, url = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = post(url + "/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_bad_chat_input(server):
    _, url = server
    for body in ({"model": "tiny", "messages": []}, {"model": "tiny", "messages": [{"role": "user"}]},
                 {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": "tiny", "messages": "hello"},
                 {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                 {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                  "top_logprobs": 21}):
        r = post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and "error" in r.json(), body
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model="tiny", prompt="a", max_tokens=0)
    assert post(url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}
                      ).status_code == 200  # still serving


def test_api_key():
    _, app = make_app(api_key="s3cret")
    with serve(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        r = post(url + "/v1/completions", json={"model": "tiny", "prompt": "a"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(url, api_key="s3cret").completions.create(model="tiny", prompt="a", max_tokens=2).usage
        assert get(url + "/health").status_code == 200


def metric(url, name):
    return parse_metrics(get(url + "/metrics").text).get(name, 0.0)


def wait_for(cond, timeout=30):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnect_frees_the_slot_and_queue_limit():
    """One row, one queue place: an endless stream holds the row, a second request waits, a third
    gets 429; dropping the stream's connection frees the row and the waiting request is served."""
    _, app = make_app("gated_deltanet", eos=False, max_batch=1, max_queue=1)
    with serve(app) as url:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 10**6, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            wait_for(lambda: metric(url, "looplm_running_requests") == 1)
            one_row = metric(url, "looplm_state_bytes")
            assert one_row > 0  # a fixed-size state: the same every step
            assert metric(url, "looplm_state_bytes") == one_row
            with httpx.Client(timeout=60) as other:
                import threading

                got = {}
                t = threading.Thread(target=lambda: got.update(r=other.post(
                    url + "/v1/completions", json={"model": "tiny", "prompt": "y", "max_tokens": 3})))
                t.start()
                wait_for(lambda: metric(url, "looplm_queue_length") == 1)
                full = post(url + "/v1/completions", json={"model": "tiny", "prompt": "z"})
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert full.json()["error"]["type"] == "rate_limit_error"
                r.close()  # the client goes away mid-stream
                t.join(60)
        assert got["r"].status_code == 200 and got["r"].json()["usage"]["completion_tokens"] == 3
        wait_for(lambda: metric(url, 'looplm_requests_total{outcome="cancelled"}') == 1)
        assert metric(url, "looplm_running_requests") == 0 and metric(url, "looplm_state_bytes") == 0
        assert metric(url, 'looplm_requests_total{outcome="length"}') == 1
        assert metric(url, "looplm_rejected_total") == 1


def test_disconnect_while_waiting_for_a_whole_response():
    """A non-streaming client that goes away before its answer frees its row; the next request
    is served."""
    _, app = make_app("gated_deltanet", eos=False, max_batch=1)
    with serve(app) as url:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 10**6}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
        wait_for(lambda: metric(url, 'looplm_requests_total{outcome="cancelled"}') == 1)
        assert metric(url, "looplm_running_requests") == 0 and metric(url, "looplm_state_bytes") == 0
        r = post(url + "/v1/completions", json={"model": "tiny", "prompt": "y", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_burst_with_malformed_requests():
    """200 requests at once, every tenth malformed: every well-formed one succeeds."""
    _, app = make_app("hybrid", max_batch=16)
    with serve(app) as url:
        async def one(i, http):
            if i % 10 == 0:
                r = await http.post("/v1/completions", content="{bad json " + str(i),
                                    headers={"content-type": "application/json"})
                return i, r.status_code, None
            body = {"model": "tiny", "prompt": "p" * (1 + i % 30), "max_tokens": 1 + i % 6, "temperature": 0,
                    "stream": i % 3 == 0}
            r = await http.post("/v1/completions", json=body)
            return i, r.status_code, r.text

        async def burst():
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
                return await asyncio.gather(*(one(i, http) for i in range(200)))

        t0 = time.time()
        results = asyncio.run(burst())
        assert time.time() - t0 < 120
        bad = [s for i, s, _ in results if i % 10 == 0]
        good = [(s, text) for i, s, text in results if i % 10]
        assert bad == [400] * 20
        assert all(s == 200 for s, _ in good), [g for g in good if g[0] != 200][:3]
        for i, _, text in results:
            if i % 10 and i % 3 == 0:
                assert text.rstrip().endswith("data: [DONE]")
            elif i % 10:
                assert json.loads(text)["usage"]["completion_tokens"] >= 1
        assert metric(url, 'looplm_requests_total{outcome="error"}') == 0


def test_chat_uses_the_tokenizers_template():
    """A tokenizer with a chat template renders the prompt (and its prompt_ids adds a bos)."""

    class Templated(type(tokenizer())):
        chat_template = "custom"
        bos_id = 256

        def apply_chat_template(self, messages):
            return "".join(f"[{m['role']}] {m['content']}\n" for m in messages) + "[assistant] "

        def prompt_ids(self, text):
            return [self.bos_id, *self.encode(text)]

    model = tiny_model("gated_deltanet")
    app = create_app(Engine(model, Templated()), model_id="tiny")
    with serve(app) as url:
        r = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "yo"}],
                                                max_tokens=3, temperature=0)
    prompt = [256, *b"[user] yo\n[assistant] "]
    expect = generate_ids(model, [prompt], max_new_tokens=3, eos_id=257)[0]
    assert r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].message.content == tokenizer().decode([i for i in expect if i != 257])
