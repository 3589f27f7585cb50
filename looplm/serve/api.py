"""The HTTP API (FastAPI): OpenAI's completions, chat completions and models endpoints, health,
Prometheus metrics and the chat page, in front of one :class:`~looplm.serve.engine.Engine`.

Every error is OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): a body that
is not JSON or has a field of the wrong type or out of range is 400, a missing or wrong API key
(when one is set) 401, a full queue 429 with ``Retry-After``. Streaming responses are
server-sent events of OpenAI's chunk objects ending with ``data: [DONE]``; a client that
disconnects mid-stream has its request cancelled (its batch rows are freed at the next step).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from looplm.generate import _has_attention
from looplm.serve.engine import Engine, Event, QueueFullError, SamplingParams
from looplm.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    completion_body,
    error_body,
    new_id,
    usage,
)
from looplm.serve.template import render_chat

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def create_app(engine: Engine, *, model_id: str, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    """The app serving ``engine`` as model ``model_id``; the engine's thread runs while the app
    does (its lifespan). ``default_max_tokens``: when a request gives none (attention models:
    at most what the context has left)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="looplm", lifespan=lifespan)
    config = engine.model.config
    bounded = _has_attention(config)
    # a pretrained model's tokenizer adds the bos token its model expects (prompt_ids)
    encode = getattr(engine.tokenizer, "prompt_ids", engine.tokenizer.encode)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ())[1:]]
        if err.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}", None
        else:
            param = loc[0] if loc else None
            message = f"{'.'.join(loc) or 'body'}: {err['msg']}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), type_="invalid_request_error"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), api_key.encode())):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type_="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.running}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(time.time()),
                                            "owned_by": "looplm"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        prompt = body.prompt if isinstance(body.prompt, list) else encode(body.prompt)
        return await _generate("text", body, prompt, [])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat(body: ChatRequest) -> Response:
        text, stops = render_chat([{"role": m.role, "content": m.text()} for m in body.messages],
                                  engine.tokenizer)
        return await _generate("chat", body, encode(text), stops)

    async def _generate(kind: str, body: Any, prompt: list[int], stops: list[str]) -> Response:
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = body.max_tokens
        if max_tokens is None:
            room = config.max_seq_len - len(prompt) if bounded else default_max_tokens
            max_tokens = max(1, min(default_max_tokens, room))
        params = SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature),
                                top_p=None if body.top_p >= 1 else float(body.top_p),
                                stop=list(body.stop or []) + stops, seed=body.seed,
                                ignore_eos=body.ignore_eos)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            req = engine.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFullError as err:
            raise APIError(429, str(err), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as err:
            raise APIError(400, str(err)) from None
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(kind, rid, req, events, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        try:
            while True:
                ev = await events.get()
                pieces.append(ev.text)
                if ev.finish_reason is not None:
                    break
        finally:
            if not req.done:
                engine.cancel(req)
        if ev.error is not None:
            raise APIError(500, f"generation failed: {ev.error}", type_="server_error")
        return JSONResponse(completion_body(kind, rid, model_id, "".join(pieces), ev.finish_reason,
                                            usage(ev.prompt_tokens, ev.completion_tokens), chunk=False))

    async def _stream(kind: str, rid: str, req: Any, events: asyncio.Queue, include_usage: bool
                      ) -> AsyncIterator[str]:
        def sse(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if kind == "chat":
                yield sse(completion_body(kind, rid, model_id, "", None, None, chunk=True, first=True))
            while True:
                ev = await events.get()
                if ev.error is not None:
                    yield sse(error_body(f"generation failed: {ev.error}", type_="server_error"))
                    break
                if ev.text or ev.finish_reason is not None:
                    yield sse(completion_body(kind, rid, model_id, ev.text, ev.finish_reason, None,
                                              chunk=True))
                if ev.finish_reason is not None:
                    if include_usage:
                        chunk = completion_body(kind, rid, model_id, "", None,
                                                usage(ev.prompt_tokens, ev.completion_tokens), chunk=True)
                        chunk["choices"] = []
                        yield sse(chunk)
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not req.done:
                engine.cancel(req)

    return app
