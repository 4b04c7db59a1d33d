"""OpenAI-compatible HTTP API: ``GET /v1/models`` and ``POST /v1/chat/completions``.

Built on FastAPI's own means: typed request/response objects (:mod:`ui.openai_models`, the
OpenAPI schema at ``/v1/openapi.json``), one authentication dependency for every ``/v1`` route
(and ``/metrics``), Server-Sent Events through sse-starlette (a ping comment every
:data:`PING_S` seconds while the request waits in line and while the prompt is evaluated, so a
proxy with an idle timeout never cuts it), errors always in OpenAI's ``{"error": {...}}`` shape
with the matching status. Reasoning travels as ``reasoning_content`` and as ``reasoning``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool

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

from backends.answers import CheckReport, SampleAnswer, SandboxUnavailable
from backends.answers.code import examples_from_tests

from .host import ModelHost, NotReady, QueueFull, Queued
from .messages import strip_thinking
from .openai_models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CodeCheck,
    CompletionTokensDetails,
    ConsensusOut,
    Delta,
    ErrorResponse,
    Extras,
    MessageIn,
    MessageOut,
    ModelCard,
    ModelList,
    ModelMetadata,
    UsageOut,
)
from .pump import Pump
from .trust import Trust, trust_for

log = logging.getLogger("ui.api")

PING_S = 15.0

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "invalid request (the param names the field)"), (401, "missing or wrong API key"),
                       (404, "unknown model"), (429, "queue full (Retry-After)"),
                       (500, "engine failure"), (503, "model loading, failed or server draining (Retry-After)"))
}


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


def _engine_error(exc: BaseException) -> ApiError:
    """What a failure of the host or engine means for the client (before anything streamed)."""
    if isinstance(exc, NotReady):
        return ApiError(503, str(exc), "server_error", code="model_not_ready")
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full")
    if isinstance(exc, RequestError):
        return ApiError(400, str(exc), "invalid_request_error", code=exc.code, param="messages")
    if isinstance(exc, BackendError):
        return ApiError(500, str(exc), "server_error", code="backend_error")
    return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error", code="internal_error")


def install_error_handlers(app: FastAPI, host: ModelHost) -> None:
    """Every error of our routes as OpenAI-shaped JSON (FastAPI's own would be 422 or plain text)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        host.metrics.errors.labels(kind="invalid_request").inc()
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return ApiError(400, f"The request body is not valid JSON ({err.get('msg')}).",
                            "invalid_request_error").response()
        param = ".".join(loc) or None
        return ApiError(400, f"Invalid request: {param or 'body'}: {err.get('msg')}", "invalid_request_error",
                        param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot decode: not UTF-8, nested too deep; 404/405):
        # the same OpenAI shape as ours instead of {"detail": ...}.
        if exc.status_code == 400:
            host.metrics.errors.labels(kind="invalid_request").inc()
            message = (f"The request body cannot be read: {exc.detail}. Send UTF-8 JSON (nested at most a few "
                       "hundred levels).")
        else:
            message = str(exc.detail)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = ApiError(exc.status_code, message, type_, code=f"http_{exc.status_code}").response()
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _engine_error(exc).response()


def api_key_guard(host: ModelHost) -> Callable[..., None]:
    """The one check of ``server.auth.api_key`` (a dependency: every /v1 route, and /metrics)."""
    key = host.manifest.server.auth.api_key.encode()
    bearer = HTTPBearer(auto_error=False, description="server.auth.api_key (when set)")

    def guard(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not key:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, key):  # constant time
            host.metrics.errors.labels(kind="auth").inc()
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' with the key set in "
                           "server.auth.api_key (or VT_API_KEY).", "invalid_request_error", code="invalid_api_key")

    return guard


def _text_of(content: str | list | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or not isinstance(part.text, str):
            raise ApiError(
                400, f"Only text content is supported; messages[{index}].content[{j}] has type {part.type!r}. "
                "Send the text as a string or as {'type': 'text', 'text': ...} parts.",
                "invalid_request_error", param=f"messages.{index}.content",
            )
        parts.append(part.text)
    return "".join(parts)


def to_backend_messages(messages: list[MessageIn]) -> tuple[ChatMessage, ...]:
    systems: list[str] = []
    chat: list[ChatMessage] = []
    for i, msg in enumerate(messages):
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


def _openai_finish(usage: Usage, answer: str) -> str:
    if usage.finish_reason == FinishReason.LENGTH:
        return "length"
    if usage.finish_reason == FinishReason.LOOP and not answer.strip():
        return "length"
    return "stop"


def _usage_out(usages: list[Usage]) -> UsageOut:
    """The request's usage: its prompt once, the completions of every sample."""
    prompt = max((u.prompt_tokens for u in usages), default=0)
    completion = sum(u.completion_tokens for u in usages)
    return UsageOut(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                    completion_tokens_details=CompletionTokensDetails(
                        reasoning_tokens=sum(u.reasoning_tokens for u in usages)))


def _extras(usage: Usage, boxed: str | None, report: CheckReport | None = None) -> Extras:
    return Extras(finish_reason=usage.finish_reason.value, detail=usage.detail, boxed_answer=boxed,
                  time_to_first_token_s=usage.time_to_first_token_s, decode_tokens_per_s=usage.decode_tokens_per_s,
                  reasoning_tokens=usage.reasoning_tokens, answer_tokens=usage.answer_tokens,
                  code_check=_code_check(report))


def _code_check(report: CheckReport | None) -> CodeCheck | None:
    if report is None:
        return None
    data = report.to_dict()
    data["isolation"] = data["isolation"] or None
    return CodeCheck.model_validate(data)


@dataclasses.dataclass
class _Sample:
    reasoning: list[str] = dataclasses.field(default_factory=list)
    answer: list[str] = dataclasses.field(default_factory=list)
    usage: Usage | None = None
    boxed: str | None = None

    def add(self, chunk: StreamChunk) -> None:
        self.reasoning.append(chunk.reasoning)
        self.answer.append(chunk.answer)
        if chunk.usage is not None:
            self.usage, self.boxed = chunk.usage, chunk.boxed_answer


def build_router(host: ModelHost) -> APIRouter:
    manifest = host.manifest
    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key_guard(host))], responses=ERROR_RESPONSES,
                       tags=["OpenAI-compatible"])

    def model_names() -> list[str]:
        names = [manifest.model.id]
        info = host.status().info
        if info is not None and info.model_id not in names:
            names.append(info.model_id)
        return names

    @router.get("/models", response_model=ModelList, summary="The served model and its state")
    def list_models() -> ModelList:
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
        return ModelList(data=[ModelCard(id=manifest.model.id, metadata=ModelMetadata(**meta))])

    @router.post(
        "/chat/completions", response_model=ChatCompletion, summary="Chat completion (streams with stream: true)",
        responses={200: {"content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}},
                         "description": "a ChatCompletion, or with stream: true Server-Sent Events of "
                                        "ChatCompletionChunk ending with data: [DONE]"}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
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
        messages = to_backend_messages(body.messages)
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
        trust = trust_for(manifest)
        checks = await _code_checks(body, messages, trust)
        req = GenerationRequest(messages=messages, params=params, n=body.n or 1)
        if req.n > 1 and checks is None:
            trust.warm()  # math-verify's worker imports while the model thinks
        try:
            # Refusals (not ready, too long, queue full) come back at once, before any waiting;
            # the prompt is tokenized here, off the event loop.
            stream = await run_in_threadpool(host.generate, req, "api")
        except (NotReady, QueueFull, BackendError) as exc:
            raise _engine_error(exc) from None
        pump = Pump(stream, name=f"api-{req.request_id[:8]}")

        def cancel() -> None:
            if not pump.finished.is_set():
                pump.stop()
                host.cancel(req.request_id)

        reply = _Reply(f"chatcmpl-{req.request_id}", int(time.time()), body.model, req.n, checks, trust)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(_sse(pump, reply, include_usage, cancel), ping=PING_S, sep="\n",
                                       headers={"Cache-Control": "no-cache"})
        return await _complete(request, pump, reply, cancel)

    return router


@dataclasses.dataclass
class _Checks:
    """check_code of one request: where the examples came from and who runs them."""

    trust: Trust
    examples: list

    def run(self, answer: str) -> CheckReport:
        return self.trust.check(answer, self.examples)


async def _code_checks(body: ChatCompletionRequest, messages: tuple[ChatMessage, ...], trust: Trust) -> _Checks | None:
    """The request's opt-in code check (extras check_code, tests), refused clearly when it cannot run."""
    if not body.check_code:
        if body.tests:
            raise ApiError(400, "'tests' are only used with check_code: true; add it, or remove 'tests'.",
                           "invalid_request_error", param="tests")
        return None
    if not trust.run_code:
        raise ApiError(400, "Code checking is off on this server: its owner can turn it on with solve.run_code: true "
                       "in manifest.yaml (or VT_RUN_CODE=true). Remove check_code to get the answer without running "
                       "it.", "invalid_request_error", code="code_checking_disabled", param="check_code")
    try:
        await run_in_threadpool(trust.sandbox)
    except SandboxUnavailable as exc:
        raise ApiError(503, str(exc), "server_error", code="sandbox_unavailable") from None
    problem = next((m.content for m in reversed(messages) if m.role == "user"), "")
    try:
        extra = examples_from_tests([t.model_dump() for t in body.tests or []])
    except ValueError as exc:
        raise ApiError(400, f"tests: {exc}", "invalid_request_error", param="tests") from None
    return _Checks(trust, trust.examples(problem, extra))


def _sample_answers(samples: list[_Sample]) -> list[SampleAnswer]:
    return [SampleAnswer(i, "".join(s.answer), s.usage.finish_reason.value if s.usage else FinishReason.CANCELLED.value)
            for i, s in enumerate(samples)]


def _consensus(samples: list[_Sample], reports: dict[int, CheckReport], checks: _Checks | None,
               trust: Trust) -> ConsensusOut:
    """The vote over the samples: their boxed answers, or (check_code) their passing programs."""
    answers = _sample_answers(samples)
    if checks is not None:
        finish = {a.index: a.finish_reason for a in answers}
        consensus = trust.code_vote(dict(reports), finish, len(samples))
    else:
        consensus = trust.vote(answers, len(samples))
    return ConsensusOut.model_validate(consensus.to_dict())


@dataclasses.dataclass
class _Reply:
    id: str
    created: int
    model: str
    n: int
    checks: _Checks | None = None
    trust: Trust | None = None

    def chunk(self, choices: list[ChunkChoice], **extra: Any) -> str:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                   **extra).model_dump_json(exclude_none=True)


async def _sse(pump: Pump, reply: _Reply, include_usage: bool, cancel: Callable[[], None]) -> AsyncIterator[Any]:
    samples = [_Sample() for _ in range(reply.n)]
    reports: dict[int, CheckReport] = {}
    finished = False
    try:
        for index in range(reply.n):
            yield reply.chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        while True:
            try:
                item = await pump.get()
            except StopAsyncIteration:
                finished = True
                break
            except Exception as exc:  # after the 200 went out: the error travels as the last event
                log.warning("stream %s failed: %s", reply.id, exc)
                yield json.dumps(_engine_error(exc).payload(), ensure_ascii=False)
                break
            if isinstance(item, Queued):
                # A comment: keeps proxies from timing out and tells a curious client where it waits.
                yield ServerSentEvent(comment=f"queued, position {item.position}")
                continue
            assert isinstance(item, StreamChunk)
            sample = samples[item.index]
            sample.add(item)
            if item.reasoning:
                delta = Delta(reasoning_content=item.reasoning, reasoning=item.reasoning)
                yield reply.chunk([ChunkChoice(index=item.index, delta=delta)])
            if item.answer:
                yield reply.chunk([ChunkChoice(index=item.index, delta=Delta(content=item.answer))])
            if item.usage is not None:
                finish = _openai_finish(item.usage, "".join(sample.answer))
                report = None
                if reply.checks is not None:
                    report = reports[item.index] = await run_in_threadpool(reply.checks.run, "".join(sample.answer))
                yield reply.chunk([ChunkChoice(index=item.index, delta=Delta(), finish_reason=finish)],
                                  vibethinker=_extras(item.usage, item.boxed_answer, report))
        if include_usage:
            usages = [s.usage for s in samples if s.usage is not None]
            yield reply.chunk([], usage=_usage_out(usages))
        if reply.n > 1 and finished and reply.trust is not None:
            # The vote, as the last event before [DONE] (a chunk without choices, like the usage one).
            consensus = await run_in_threadpool(_consensus, samples, reports, reply.checks, reply.trust)
            yield reply.chunk([], consensus=consensus)
        yield "[DONE]"
    finally:
        cancel()


async def _complete(request: Request, pump: Pump, reply: _Reply, cancel: Callable[[], None]) -> Any:
    samples = [_Sample() for _ in range(reply.n)]
    gone = asyncio.Event()

    async def watch() -> None:
        # A client that hangs up stops the generation at once, not after it has finished.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        log.info("api client of %s disconnected; cancelling", reply.id)
        cancel()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            try:
                item = await pump.get()
            except StopAsyncIteration:
                break
            if isinstance(item, StreamChunk):
                samples[item.index].add(item)
    except Exception as exc:
        raise _engine_error(exc) from None
    finally:
        watcher.cancel()
        cancel()
    if gone.is_set():
        return JSONResponse({}, status_code=499)  # nobody is listening; for the access log only
    reports: dict[int, CheckReport] = {}
    if reply.checks is not None:
        runs = [run_in_threadpool(reply.checks.run, "".join(s.answer)) for s in samples]
        reports = dict(enumerate(await asyncio.gather(*runs)))  # the sandbox admits parallel_runs at once
    choices = []
    for index, sample in enumerate(samples):
        usage = sample.usage or Usage(finish_reason=FinishReason.CANCELLED)
        text, thought = "".join(sample.answer), "".join(sample.reasoning)
        choices.append(Choice(index=index, message=MessageOut(content=text, reasoning_content=thought,
                                                              reasoning=thought),
                              finish_reason=_openai_finish(usage, text),
                              vibethinker=_extras(usage, sample.boxed, reports.get(index))))
    usages = [s.usage or Usage(finish_reason=FinishReason.CANCELLED) for s in samples]
    consensus = None
    if reply.n > 1 and reply.trust is not None:
        consensus = await run_in_threadpool(_consensus, samples, reports, reply.checks, reply.trust)
    return ChatCompletion(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                          usage=_usage_out(usages), vibethinker=choices[0].vibethinker, consensus=consensus)
