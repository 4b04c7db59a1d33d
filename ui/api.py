"""OpenAI-compatible HTTP API: ``GET /v1/models`` and ``POST /v1/chat/completions``.

Reasoning travels as ``reasoning_content`` (DeepSeek/vLLM style) and as ``reasoning`` (OpenRouter
style) because clients differ. Our extras ``thinking_budget``, ``seed`` and ``top_k`` are optional
body fields. Errors use OpenAI's ``{"error": {...}}`` shape with the matching status code.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from backends import (
    BackendError,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    RequestError,
    StreamChunk,
    Usage,
    to_sampling_params,
)

from .host import ModelHost, NotReady, QueueFull, Queued
from .messages import strip_thinking
from .pump import Pump

log = logging.getLogger("ui.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "5"} if self.status in (429, 503) else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(self.payload(), status_code=self.status, headers=headers)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    thinking_budget: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = None
    tools: list[Any] | None = None


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(
                400, f"Only text content is supported; messages[{index}].content[{j}] has type "
                f"{part.get('type')!r}. Send the text as a string or as {{'type': 'text', 'text': ...}} parts.",
                "invalid_request_error", param=f"messages.{index}.content",
            )
        parts.append(part["text"])
    return "".join(parts)


def to_backend_messages(body: ChatCompletionBody) -> tuple[ChatMessage, ...]:
    systems: list[str] = []
    chat: list[ChatMessage] = []
    for i, msg in enumerate(body.messages):
        text = _text_of(msg.content, i)
        if msg.role in ("system", "developer"):
            if text.strip():
                systems.append(text.strip())
        elif msg.role == "assistant":
            chat.append(ChatMessage("assistant", strip_thinking(text)))
        else:
            chat.append(ChatMessage("user", text))
    if not any(m.role == "user" for m in chat):
        raise ApiError(400, "messages must contain at least one message with role 'user'.",
                       "invalid_request_error", param="messages")
    # One leading system message: the chat template only honours the first one.
    head = (ChatMessage("system", "\n\n".join(systems)),) if systems else ()
    return head + tuple(chat)


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return ApiError(400, f"Invalid request: {param}: {err['msg']}", "invalid_request_error", param=param)


def _openai_finish(usage: Usage, answer: str) -> str:
    if usage.finish_reason == FinishReason.LENGTH:
        return "length"
    if usage.finish_reason == FinishReason.LOOP and not answer.strip():
        return "length"
    return "stop"


def _usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def _extras(usage: Usage, boxed: str | None) -> dict[str, Any]:
    return {
        "finish_reason": usage.finish_reason.value,
        "detail": usage.detail,
        "boxed_answer": boxed,
        "time_to_first_token_s": usage.time_to_first_token_s,
        "decode_tokens_per_s": usage.decode_tokens_per_s,
    }


class _SSEResponse(StreamingResponse):
    """A stream that notices a dropped client at once (even while it waits in line) and always
    runs ``on_close`` so that the backend's generation is cancelled."""

    def __init__(self, content: AsyncIterator[str], on_close: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self._on_close()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except OSError:  # the client went away mid-send
            pass
        finally:
            watcher.cancel()
            self._on_close()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def build_router(host: ModelHost) -> APIRouter:
    manifest = host.manifest
    router = APIRouter()
    api_key = manifest.server.auth.api_key

    def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            host.metrics.errors.labels(kind="auth").inc()
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' with the key set in "
                           "server.auth.api_key (or VT_API_KEY).", "invalid_request_error", code="invalid_api_key")

    def model_names() -> list[str]:
        names = [manifest.model.id]
        info = host.status().info
        if info is not None and info.model_id not in names:
            names.append(info.model_id)
        return names

    @router.get("/v1/models")
    def list_models(request: Request) -> JSONResponse:
        try:
            check_key(request)
        except ApiError as exc:
            return exc.response()
        st = host.status()
        info = st.info
        meta: dict[str, Any] = {"status": st.state}
        if info is not None:
            meta.update(backend=info.backend, device=info.device, dtype=info.dtype,
                        context_length=info.context_length, reason=info.reason, model_path=info.model_path)
        elif st.state == "failed":
            meta["error"] = st.error
        else:
            meta.update(progress=st.fraction, message=st.message)
        return JSONResponse({
            "object": "list",
            "data": [{"id": manifest.model.id, "object": "model", "created": 0, "owned_by": "WeiboAI",
                      "metadata": meta}],
        })

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            try:
                raw = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "The request body is not valid JSON.", "invalid_request_error") from None
            try:
                body = ChatCompletionBody.model_validate(raw)
            except ValidationError as exc:
                raise _validation_error(exc) from None
            if body.model not in model_names():
                host.metrics.errors.labels(kind="model_not_found").inc()
                raise ApiError(404, f"The model {body.model!r} does not exist; this server serves "
                               f"{', '.join(repr(n) for n in model_names())} (see GET /v1/models).",
                               "invalid_request_error", code="model_not_found", param="model")
            if body.stop:
                raise ApiError(400, "Stop sequences are not supported by this server: remove 'stop'.",
                               "invalid_request_error", param="stop")
            if body.tools:
                raise ApiError(400, "Tools are not supported by VibeThinker: remove 'tools'.",
                               "invalid_request_error", param="tools")
            messages = to_backend_messages(body)
        except ApiError as exc:
            if exc.status == 400:
                host.metrics.errors.labels(kind="invalid_request").inc()
            return exc.response()

        params = to_sampling_params(
            manifest.generation,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            seed=body.seed,
        )
        if body.thinking_budget is not None:
            # 0 = unlimited, as in manifest.yaml.
            params = dataclasses.replace(params, thinking_budget=body.thinking_budget or None)
        req = GenerationRequest(messages=messages, params=params)
        pump = Pump(host.generate(req, "api"), name=f"api-{req.request_id[:8]}")
        try:
            first = await pump.get()
        except StopAsyncIteration:
            first = None
        except NotReady as exc:
            return ApiError(503, str(exc), "server_error", code="model_not_ready").response()
        except QueueFull as exc:
            return ApiError(429, str(exc), "rate_limit_error", code="queue_full").response()
        except RequestError as exc:
            return ApiError(400, str(exc), "invalid_request_error", code=exc.code, param="messages").response()
        except BackendError as exc:
            return ApiError(500, str(exc), "server_error", code="backend_error").response()

        def cancel() -> None:
            if not pump.finished.is_set():
                pump.stop()
                host.cancel(req.request_id)

        completion_id = f"chatcmpl-{req.request_id}"
        created = int(time.time())
        model = body.model
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _SSEResponse(_sse(pump, first, completion_id, created, model, include_usage), cancel)
        return await _complete(request, pump, first, cancel, completion_id, created, model)

    return router


def _sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(pump: Pump, first: Any, cid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _sse_data({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                          **extra})

    yield chunk({"role": "assistant", "content": ""})
    answer = ""
    item = first
    while True:
        if isinstance(item, Queued):
            yield f": queued, position {item.position}\n\n"  # an SSE comment keeps proxies from timing out
        elif isinstance(item, StreamChunk):
            if item.reasoning:
                yield chunk({"reasoning_content": item.reasoning, "reasoning": item.reasoning})
            if item.answer:
                answer += item.answer
                yield chunk({"content": item.answer})
            if item.usage is not None:
                yield chunk({}, _openai_finish(item.usage, answer), vibethinker=_extras(item.usage, item.boxed_answer))
                if include_usage:
                    yield _sse_data({"id": cid, "object": "chat.completion.chunk", "created": created,
                                     "model": model, "choices": [], "usage": _usage_json(item.usage)})
        try:
            item = await pump.get()
        except StopAsyncIteration:
            break
        except (BackendError, NotReady) as exc:
            yield _sse_data(ApiError(500, str(exc), "server_error", code="backend_error").payload())
            break
        except Exception as exc:
            yield _sse_data(ApiError(500, f"{type(exc).__name__}: {exc}", "server_error").payload())
            break
    yield "data: [DONE]\n\n"


async def _complete(request: Request, pump: Pump, first: Any, cancel: Any, cid: str, created: int,
                    model: str) -> JSONResponse:
    reasoning, answer = [], []
    usage: Usage | None = None
    boxed: str | None = None
    item = first
    gone = asyncio.Event()

    async def watch() -> None:
        # A client that hangs up stops the generation at once, not after it has finished.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        log.info("api client of %s disconnected; cancelling", cid)
        cancel()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            if isinstance(item, StreamChunk):
                reasoning.append(item.reasoning)
                answer.append(item.answer)
                if item.usage is not None:
                    usage, boxed = item.usage, item.boxed_answer
            item = await pump.get()
    except StopAsyncIteration:
        pass
    except BackendError as exc:
        return ApiError(500, str(exc), "server_error", code="backend_error").response()
    finally:
        watcher.cancel()
        cancel()
    if gone.is_set():
        return JSONResponse({}, status_code=499)  # nobody is listening; for the access log only
    if usage is None:
        usage = Usage(finish_reason=FinishReason.CANCELLED)
    text = "".join(answer)
    thought = "".join(reasoning)
    return JSONResponse({
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "reasoning_content": thought, "reasoning": thought},
            "finish_reason": _openai_finish(usage, text),
            "logprobs": None,
        }],
        "usage": _usage_json(usage),
        "vibethinker": _extras(usage, boxed),
    })
