"""The FastAPI app: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /v1/models/{id}` and `GET /health`, each answer in OpenAI's shape (streamed as server-sent
events when asked). Every bad request gets a 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from lmpipe.serve.engine import Completer, Job, Sampling
from lmpipe.serve.errors import RequestError, error_body, error_response
from lmpipe.serve.guard import LEASE, Guard
from lmpipe.serve.schema import (
    ChatRequest,
    CommonRequest,
    CompletionRequest,
    parse_body,
    read_request,
)

log = logging.getLogger("lmpipe.serve")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(completer: Completer, api_key: str | None = None, docs: bool = False):
    """The FastAPI app. `api_key`: required as `Authorization: Bearer` on every endpoint but
    /health. `docs`: serve /docs, /redoc and /openapi.json (off by default)."""
    import anyio
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse

    from lmpipe.chat import TemplateError

    app = FastAPI(
        title="lmpipe",
        version="1",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(Guard, admission=completer.admission, api_key=api_key)

    @app.exception_handler(RequestError)
    async def _bad(_request: Request, exc: RequestError):
        return error_response(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return error_response(400, "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log.error("internal error: %r", exc)
        return error_response(500, "internal server error")

    @app.get("/health")
    async def health():
        s = completer.status()
        ready = s["worker_alive"] and s["free"] > 0
        status = "ok" if ready else "busy" if s["worker_alive"] else "down"
        return JSONResponse({"status": status, **s}, 200 if ready else 503)

    def model_card() -> dict[str, Any]:
        return {"id": completer.name, "object": "model", "created": 0, "owned_by": "lmpipe"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in completer.aliases:
            raise RequestError(
                f"the model {model_id!r} does not exist; this server has {completer.name!r}",
                404,
                "model",
                "model_not_found",
            )
        return model_card()

    schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}}

    async def read(request: Request, kind: type[CommonRequest]):
        body = await request.body()
        if len(body) > 1 << 16:  # parse big bodies off the event loop: /health stays quick
            return await anyio.to_thread.run_sync(lambda: read_request(parse_body(body), kind))
        return read_request(parse_body(body), kind)

    async def start(request: Request, rows, sampling: Sampling) -> tuple[Job, tuple]:
        """Submit the job and wait for its first event, so an error before any token is still
        an HTTP status."""
        job = completer.submit(rows, sampling, request.scope[LEASE])
        first = await job.events.get()
        if first[0] == "error":
            raise first[1]
        return job, first

    async def events(job: Job, first: tuple) -> AsyncIterator[tuple[str, Any]]:
        item = first
        try:
            while True:
                yield item
                if item[0] in ("done", "cancelled"):
                    return
                item = await job.events.get()
                if item[0] == "error":
                    raise item[1]
        finally:
            job.cancel()  # a no-op once done; ends the rows if the client left

    async def collect(job: Job, first: tuple) -> dict[str, Any] | None:
        async for kind, value in events(job, first):
            if kind == "done":
                return value
        return None  # cancelled: the client is gone

    async def admit_and_encode(request: Request, encode: Callable[[], Any]):
        request.scope[LEASE].acquire()  # 429 when full; everything costly comes after
        return await anyio.to_thread.run_sync(encode)

    @app.post("/v1/completions", openapi_extra=schema)
    async def completions(request: Request):
        req: CompletionRequest = await read(request, CompletionRequest)
        prompts = req.texts()
        completer.admission.check_prompts(prompts)
        completer.admission.check(req, prompts)
        distinct = list(dict.fromkeys(prompts))  # each distinct prompt tokenized once
        try:
            encoded = await admit_and_encode(
                request, lambda: [completer.lm.prompt_ids(p) for p in distinct]
            )
        except TemplateError as err:
            raise RequestError(
                f"the prompt does not fit the model's chat template: {err}", param="prompt"
            ) from None
        ids = dict(zip(distinct, encoded, strict=True))
        completer.admission.check_tokens([ids[p] for p in prompts], req.n, req.max_tokens, "prompt")
        rows = [ids[p] for p in prompts for _ in range(req.n)]
        sampling = Sampling(
            req.max_tokens, req.temperature, req.top_k, req.top_p, req.seed, req.stop
        )
        job, first = await start(request, rows, sampling)
        head = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": completer.name,
        }
        prompt_tokens = sum(len(ids[p]) for p in prompts)
        if not req.stream:
            result = await collect(job, first)
            if result is None:
                return Response(status_code=499)
            choices = [
                {"text": t, "index": i, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(
                    zip(result["text"], result["finish_reason"], strict=True)
                )
            ]
            usage = _usage(prompt_tokens, result["completion_tokens"])
            return {**head, "choices": choices, "usage": usage}

        usage_chunk = req.stream_options is not None and req.stream_options.include_usage

        def chunk(i: int, text: str, reason: str | None) -> dict[str, Any]:
            c = {"text": text, "index": i, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [c], **({"usage": None} if usage_chunk else {})}

        async def body() -> AsyncIterator[str]:
            try:
                async for kind, value in events(job, first):
                    if kind == "delta":
                        for i, d in enumerate(value):
                            if d:
                                yield _sse(chunk(i, d, None))
                    elif kind == "done":
                        for i, r in enumerate(value["finish_reason"]):
                            yield _sse(chunk(i, "", r))
                        if usage_chunk:
                            u = _usage(prompt_tokens, value["completion_tokens"])
                            yield _sse({**head, "choices": [], "usage": u})
                yield "data: [DONE]\n\n"
            except Exception as err:  # after the 200: the error goes in the stream
                log.error("stream failed: %r", err)
                yield _sse(error_body("internal server error", "server_error"))

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", openapi_extra=schema)
    async def chat_completions(request: Request):
        req: ChatRequest = await read(request, ChatRequest)
        if completer.template is None:
            raise RequestError(
                f"the bundle {completer.name!r} has no chat template, so it cannot take "
                "messages: use /v1/completions with a prompt, or re-export the model from a "
                "folder with a chat template (chat_template.jinja or tokenizer_config.json)",
                param="messages",
            )
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise RequestError(
                "give max_completion_tokens or max_tokens, not both", param="max_tokens"
            )
        messages = [m.for_template() for m in req.messages]
        completer.admission.check(req, [m["content"] for m in messages])
        try:
            prompt = await admit_and_encode(request, lambda: completer.lm.chat_ids(messages))
        except TemplateError as err:
            raise RequestError(
                f"these messages do not fit the model's chat template: {err}", param="messages"
            ) from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # OpenAI's default: as long as the context allows
            max_tokens = max(1, min(completer.limits.max_tokens, completer.context - len(prompt)))
        completer.admission.check_tokens([prompt], req.n, max_tokens, "messages")
        sampling = Sampling(max_tokens, req.temperature, req.top_k, req.top_p, req.seed, req.stop)
        job, first = await start(request, [prompt] * req.n, sampling)
        head = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": completer.name,
            "system_fingerprint": None,
        }
        if not req.stream:
            result = await collect(job, first)
            if result is None:
                return Response(status_code=499)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t, "refusal": None},
                    "logprobs": None,
                    "finish_reason": r,
                }
                for i, (t, r) in enumerate(
                    zip(result["text"], result["finish_reason"], strict=True)
                )
            ]
            usage = _usage(len(prompt), result["completion_tokens"])
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

        usage_chunk = req.stream_options is not None and req.stream_options.include_usage
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(i: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
            c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [c], **({"usage": None} if usage_chunk else {})}

        async def body() -> AsyncIterator[str]:
            try:
                for i in range(req.n):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}, None))
                async for kind, value in events(job, first):
                    if kind == "delta":
                        for i, d in enumerate(value):
                            if d:
                                yield _sse(chunk(i, {"content": d}, None))
                    elif kind == "done":
                        for i, r in enumerate(value["finish_reason"]):
                            yield _sse(chunk(i, {}, r))
                        if usage_chunk:
                            u = _usage(len(prompt), value["completion_tokens"])
                            yield _sse({**head, "choices": [], "usage": u})
                yield "data: [DONE]\n\n"
            except Exception as err:
                log.error("stream failed: %r", err)
                yield _sse(error_body("internal server error", "server_error"))

        return StreamingResponse(body(), media_type="text/event-stream")

    return app
