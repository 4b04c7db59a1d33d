"""The remote engine: the page and the API in front of an OpenAI-compatible upstream server.

``backend: remote`` sends every generation to ``remote.base_url`` (vLLM, SGLang, llama-server,
llama-cpp-python's server, another vibethinker-app, …) and keeps everything else of the app: the
fair line (``remote.max_concurrency`` sequences at once), the ``<think>`` split, the boxed answer,
the thinking budget, the loop guard, auth, metrics, ``/health``. It needs no local model and
neither torch nor llama.cpp (the ``remote`` extra is httpx only).

How it works:

- One asyncio loop in a background thread does all HTTP (httpx). ``stream()`` hands a request to
  it and reads the chunks from a queue; closing the stream (Stop, a closed tab, a dropped client)
  or ``cancel()`` cancels the request's task, which closes its upstream connection at once, and
  the upstream stops generating.
- The reply arrives as text. Reasoning comes in whichever shape the upstream sends:
  ``reasoning_content`` or ``reasoning`` delta fields (a reasoning parser), or ``<think>…</think>``
  inside ``content`` (none); :mod:`.remote_policy` applies the local engines' rules to it.
- The thinking budget is passed natively where the upstream takes one per request (vLLM
  ``thinking_token_budget``, SGLang ``custom_params.thinking_budget``, vibethinker-app
  ``thinking_budget``) and enforced by us otherwise (llama-server's budget is a server flag) or
  when the upstream ignores it (a native budget needs server flags too, so ours stays as a safety
  net a little above it): we close the chat stream at the budget and continue through
  ``/v1/completions`` on the rendered prompt + the reply so far + our closing text, so that the
  model still answers. The prompt is rendered with the model's chat template (``remote.chat_template``,
  ``model.path``'s, or llama-server's ``/apply-template``). A loop while thinking is closed the
  same way; a loop in the answer ends the reply (finish reason ``loop``).
- ``n`` samples pass through as OpenAI ``n`` (one upstream request, chunks carry their index),
  except to llama.cpp servers, which serve one choice per request: there each sample is its own
  request (seed + i). When one sample of a shared stream must be cut, every unfinished sample
  continues on its own through ``/v1/completions``.
- Health: a watcher asks ``GET /models`` every ``remote.health_interval_s`` (every second while
  it fails); :meth:`RemoteBackend.unavailable` says why the upstream cannot serve (unreachable, no
  such model, refusing our key, still loading), so ``/health`` is 503 with that reason and new
  requests get 503 + Retry-After at once, and 200 again as soon as it answers — no restart.
  Connecting is retried with backoff (httpx's transport retries) only when it fails, which is
  before anything was sent or streamed.
- ``remote.api_key`` travels only in the Authorization header to the upstream: it is never in
  ``info()``, logs, ``/v1/models`` or the page. A plain-HTTP ``base_url`` to another machine gets
  a start-up warning.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import queue
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..base import Backend, ProgressCallback, ServiceUnavailable
from ..config import Manifest
from ..registry import EngineSpec
from ..types import (
    BackendError,
    BackendInfo,
    ChatMessage,
    ContextLengthExceeded,
    FinishReason,
    GenerationRequest,
    LoadProgress,
    RequestError,
    SamplingParams,
    StreamChunk,
    Usage,
)
from .remote_policy import CHARS_PER_TOKEN, CLOSE, STOP, Cut, TextReply

log = logging.getLogger(__name__)

PIP_FIX = "pip install -e '.[remote]' (httpx)"
PROBE_TIMEOUT_S = 3.0  # a health check that takes longer counts as "does not answer"
DOWN_INTERVAL_S = 1.0  # health checks while the upstream does not answer
START_RETRY_S = 2.0  # while loading: how often to look for an upstream that does not answer yet
BUSY_GRACE_S = 10.0  # a slow health check within this long of streamed data means "busy", not "gone"
_ERROR_TEXT_MAX = 500
_CONTEXT_WORDS = re.compile(r"context length|context window|maximum context|too long|n_ctx|exceeds? the", re.I)
_MAX_TOKENS_WORDS = re.compile(r"max_tokens|max_completion_tokens|max_new_tokens|context length|maximum context", re.I)


class UpstreamUnavailable(ServiceUnavailable):
    """The upstream does not answer, or is too busy to take the request: HTTP 503, try again."""


class _Waiting(Exception):
    """The upstream cannot serve yet (unreachable, loading); look again soon. ``slow``: it is
    there but did not answer in time (busy)."""

    def __init__(self, message: str, slow: bool = False) -> None:
        super().__init__(message)
        self.slow = slow


# -- what serves the upstream ----------------------------------------------------------------------

@dataclass(frozen=True)
class UpstreamKind:
    name: str
    label: str
    native_n: bool = True  # honours OpenAI n (several choices in one stream)
    completions: bool = True  # has /v1/completions (to continue a reply whose thinking we closed)
    budget: Callable[[int], dict[str, Any]] | None = None  # the per-request budget field, if any
    sampling: Callable[[SamplingParams], dict[str, Any]] = lambda params: {}


def _top_k_if_set(params: SamplingParams) -> dict[str, Any]:
    # vLLM/SGLang: leaving top_k out is "off" in every version (0 was rejected by older vLLM).
    return {"top_k": params.top_k} if params.top_k > 0 else {}


KINDS: dict[str, UpstreamKind] = {
    "vllm": UpstreamKind("vllm", "vLLM", budget=lambda n: {"thinking_token_budget": n}, sampling=_top_k_if_set),
    "sglang": UpstreamKind("sglang", "SGLang", budget=lambda n: {"custom_params": {"thinking_budget": n}},
                           sampling=_top_k_if_set),
    # llama-server and llama-cpp-python's server: one choice per request, a budget only as a server
    # flag, and sampling defaults of their own (top_k 40, min_p 0.05, repeat penalty 1.1 in
    # llama-cpp-python) that are not the model card's: send the card's explicitly.
    "llamacpp": UpstreamKind("llamacpp", "llama.cpp server", native_n=False,
                             sampling=lambda p: {"top_k": p.top_k, "min_p": 0.0, "repeat_penalty": 1.0}),
    # Another vibethinker-app: its own budget and loop guard, no /v1/completions.
    "vibethinker": UpstreamKind("vibethinker", "vibethinker-app", completions=False,
                                budget=lambda n: {"thinking_budget": n}, sampling=lambda p: {"top_k": p.top_k}),
    "openai": UpstreamKind("openai", "OpenAI-compatible server"),
}


def detect_kind(card: dict[str, Any]) -> str:
    """The upstream's kind from its ``/v1/models`` entry (``owned_by`` names the server)."""
    owner = str(card.get("owned_by", "")).lower()
    if owner in ("vllm", "sglang", "llamacpp"):
        return owner
    if owner == "me" and "permissions" in card:  # llama-cpp-python's server says so
        return "llamacpp"
    meta = card.get("metadata")
    if isinstance(meta, dict) and "status" in meta:  # another vibethinker-app: its model's state
        return "vibethinker"
    return "openai"


def _context_of(card: dict[str, Any]) -> int:
    """The context window the upstream states: vLLM/SGLang ``max_model_len``, another
    vibethinker-app ``metadata.context_length``, llama-server ``meta.n_ctx_train``; 0 = unknown."""
    meta = card.get("metadata") if isinstance(card.get("metadata"), dict) else {}
    llama_meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
    for value in (card.get("max_model_len"), meta.get("context_length"), llama_meta.get("n_ctx_train")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _not_serving(card: dict[str, Any]) -> str | None:
    """Another vibethinker-app lists its model while it loads; say so instead of sending to it."""
    meta = card.get("metadata")
    if isinstance(meta, dict) and meta.get("status") not in (None, "ready"):
        status = meta.get("status")
        more = meta.get("error") or meta.get("message") or ""
        return f"is {status}" + (f" ({more})" if more else "")
    return None


# -- addresses -----------------------------------------------------------------------------------

def require_base_url(manifest: Manifest) -> str:
    url = manifest.remote.base_url
    if not url:
        raise BackendError(
            "backend: remote needs remote.base_url, the upstream's OpenAI-compatible address ending in /v1: "
            "--set remote.base_url=http://127.0.0.1:8000/v1 (or VT_REMOTE__BASE_URL, or manifest.yaml)."
        )
    return url


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_warning(url: str) -> str | None:
    """The start-up warning for an unencrypted upstream on another machine, or None."""
    if urlsplit(url).scheme != "http" or is_loopback(url):
        return None
    return (f"remote.base_url {url} is plain HTTP to another machine: prompts, answers and remote.api_key "
            "cross the network unencrypted. Use https:// (a TLS proxy in front of the upstream) or an SSH tunnel "
            "to 127.0.0.1 / remote.base_url 是发往其他机器的明文 HTTP：提示词、回答和密钥未加密，"
            "请改用 https:// 或 SSH 隧道。")


def _root_of(url: str) -> str:
    return url[: -len("/v1")] if url.endswith("/v1") else url


# -- the model's chat template -------------------------------------------------------------------

class ChatTemplate:
    """Renders a conversation into the prompt text the model sees, for ``/v1/completions``."""

    source = ""
    local = False

    async def render(self, messages: Sequence[ChatMessage]) -> str:
        raise NotImplementedError


class LocalTemplate(ChatTemplate):
    """A Jinja chat template held here (the same rendering as the llama.cpp engine and HF's)."""

    local = True

    def __init__(self, text: str, source: str, bos: str = "", eos: str = "") -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateError as exc:
            raise BackendError(f"The chat template in {source} is not valid Jinja ({exc}); fix remote.chat_template.")
        self.source = source
        self._vars = {"bos_token": bos, "eos_token": eos}

    def render_now(self, messages: Sequence[ChatMessage]) -> str:
        import jinja2

        try:
            return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=True, **self._vars)
        except jinja2.TemplateError as exc:
            raise RequestError(f"The model's chat template ({self.source}) refuses this conversation: {exc}") from None

    async def render(self, messages: Sequence[ChatMessage]) -> str:
        return self.render_now(messages)

    @classmethod
    def from_path(cls, path: Path) -> LocalTemplate | None:
        """A template from a ``.jinja`` file, a ``tokenizer_config.json`` or a model folder holding
        one of them; None when a folder holds neither. Raises BackendError on a broken file."""
        config: dict[str, Any] = {}
        config_path = path / "tokenizer_config.json" if path.is_dir() else path
        if config_path.name.endswith(".json") and config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise BackendError(f"{config_path} cannot be read as JSON ({exc}).") from None
        text: Any = None
        source = str(path)
        if path.is_dir():
            jinja_file = path / "chat_template.jinja"
            if jinja_file.is_file():
                text, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
            elif config.get("chat_template"):
                text, source = config["chat_template"], str(config_path)
            else:
                return None
        elif not path.is_file():
            raise BackendError(f"remote.chat_template {path} does not exist: name a .jinja file, a "
                               "tokenizer_config.json or the model's folder.")
        elif path.name.endswith(".json"):
            text = config.get("chat_template")
            if not text:
                raise BackendError(f"{path} has no chat_template: name the model's tokenizer_config.json or a "
                                   ".jinja file.")
        else:
            text = path.read_text(encoding="utf-8")
        if isinstance(text, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
            text = named.get("default") or next(iter(named.values()), None)
        if not isinstance(text, str) or not text.strip():
            raise BackendError(f"The chat template in {source} is empty.")

        def token(value: Any) -> str:
            return value.get("content", "") if isinstance(value, dict) else (value or "")

        return cls(text, source, token(config.get("bos_token")), token(config.get("eos_token")))


class UpstreamTemplate(ChatTemplate):
    """llama-server renders its own template: ``POST /apply-template {"messages"}`` → ``{"prompt"}``."""

    def __init__(self, client: Any, url: str) -> None:
        self._client = client
        self._url = url
        self.source = url

    async def render(self, messages: Sequence[ChatMessage]) -> str:
        resp = await self._client.post(self._url, json={"messages": [{"role": m.role, "content": m.content}
                                                                     for m in messages]})
        if resp.status_code != 200:
            raise BackendError(f"The upstream could not render the prompt ({self._url}: HTTP {resp.status_code}).")
        prompt = resp.json().get("prompt")
        if not isinstance(prompt, str):
            raise BackendError(f"The upstream's {self._url} sent no prompt.")
        return prompt

    @classmethod
    async def probe(cls, client: Any, base_url: str) -> UpstreamTemplate | None:
        url = _root_of(base_url) + "/apply-template"
        try:
            resp = await client.post(url, json={"messages": [{"role": "user", "content": "1+1?"}]},
                                     timeout=PROBE_TIMEOUT_S)
            if resp.status_code == 200 and isinstance(resp.json().get("prompt"), str):
                return cls(client, url)
        except Exception:  # noqa: BLE001 - any failure means "not offered"
            return None
        return None


# -- plumbing --------------------------------------------------------------------------------------

class _Runner:
    """One asyncio loop in a daemon thread; every upstream request is a task on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vt-remote-io", daemon=True)
        self._thread.start()

    def submit(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def call(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_all(), timeout=5)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


class _Done:
    pass


@dataclass
class _Failure:
    error: BaseException


_DONE = _Done()


@dataclass
class _Job:
    request: GenerationRequest
    messages: tuple[ChatMessage, ...]
    out: queue.Queue = field(default_factory=queue.Queue)
    started_at: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None  # on the I/O loop
    prompt: str | None = None  # the rendered prompt (continuations), once known
    prompt_tokens: int = 0
    emitted: bool = False  # text has streamed to the caller
    finals: set[int] = field(default_factory=set)  # samples whose last chunk went out

    def emit(self, chunk: StreamChunk) -> None:
        if chunk.reasoning or chunk.answer:
            self.emitted = True
        if chunk.final:
            self.finals.add(chunk.index)
        self.out.put(chunk)


@dataclass
class _Sample:
    """A sample's state between upstream streams (the text policy lives in ``reply``)."""

    reply: TextReply
    cut: Cut | None = None  # why it left its stream (budget, loop, length)
    finish: str | None = None  # the upstream's finish_reason for it
    extras: dict[str, Any] | None = None  # a vibethinker-app upstream's own finish details
    detached: bool = False  # its shared stream was closed for another sample: continue it alone
    streams: int = 0  # upstream streams it took part in
    exact: tuple[int, int] | None = None  # (reasoning, answer) tokens from the upstream's usage
    deferred: bool = False  # a loop while thinking was left to the upstream once (no way to continue)
    shared: bool = False  # it was asked for as one of n choices of one request

    @property
    def open(self) -> bool:
        return not self.reply.done and self.cut is None and self.finish is None


def _error_text(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or err)
        elif isinstance(err, str):
            text = err
        if "detail" in data and not isinstance(data.get("error"), (dict, str)):
            text = str(data["detail"])
    text = " ".join(str(text).split())
    return text[:_ERROR_TEXT_MAX] or "(no message)"


def _transport_text(exc: BaseException, timeout: float) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {timeout:g} s"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    text = str(exc) or type(exc).__name__
    # anyio says "All connection attempts failed" when every address refused the connection.
    if "refused" in text.lower() or (isinstance(exc, httpx.ConnectError) and "all connection attempts" in text.lower()):
        return "connection refused: nothing listens there"
    return text


def _share_usage(samples: list[_Sample], usage: dict[str, Any]) -> None:
    """The upstream's token counts for a finished stream: exact for one sample, shared in
    proportion to the streamed pieces for n samples (the upstream reports them together)."""
    total = usage.get("completion_tokens")
    if not isinstance(total, int) or total < 0:
        return
    details = usage.get("completion_tokens_details")
    thought = details.get("reasoning_tokens") if isinstance(details, dict) else None
    r = [s.reply.reasoning_pieces for s in samples]
    a = [s.reply.answer_pieces for s in samples]
    if isinstance(thought, int) and 0 <= thought <= total:
        fr, fa = thought / max(1, sum(r)), (total - thought) / max(1, sum(a))
    else:
        fr = fa = total / max(1, sum(r) + sum(a))
    for s, ri, ai in zip(samples, r, a):
        s.exact = (round(ri * fr), round(ai * fa))


async def _gather_or_cancel(coros: list[Awaitable[Any]]) -> None:
    """Run together; the first failure cancels the rest (asyncio.TaskGroup is Python 3.11+)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# -- the engine --------------------------------------------------------------------------------------

class RemoteBackend(Backend):
    name = "remote"

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.settings = manifest.remote
        self.url = manifest.remote.base_url
        self._load_lock = threading.Lock()
        self._loaded = False
        self._runner: _Runner | None = None
        self._client: Any = None
        self._probe_client: Any = None
        self._wake: asyncio.Event | None = None
        self._watcher: concurrent.futures.Future | None = None
        self.model = ""
        self.kind = KINDS["openai"]
        self.context_length = 0
        self.template: ChatTemplate | None = None
        self._problem: tuple[str, float] | None = None
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._omit_max_tokens = False
        self._split_n = False  # the upstream answered one choice when asked for n: one request per sample
        self._last_data_at = -BUSY_GRACE_S  # when a reply last streamed something (health: busy ≠ gone)

    # -- loading ----------------------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> None:
        """Find the upstream and its model. While it does not answer, the load waits (reporting
        why through ``progress``, every few seconds) — without a progress callback it fails
        with :class:`UpstreamUnavailable` instead. A wrong key or address fails at once."""
        with self._load_lock:
            if self._loaded:
                return
            self.url = require_base_url(self.manifest)
            warning = plain_http_warning(self.url)
            if warning:
                log.warning(warning)
            httpx_log = logging.getLogger("httpx")
            if httpx_log.level == logging.NOTSET:
                httpx_log.setLevel(logging.WARNING)  # one INFO line per health check is noise
            self._runner = _Runner()
            try:
                self._runner.call(self._open_clients())
                if progress is not None:
                    progress(LoadProgress(0.1, f"connecting to the upstream at {self.url}"))
                while True:
                    try:
                        self._runner.call(self._discover())
                        break
                    except _Waiting as exc:
                        message = f"waiting for the upstream at {self.url}, which {exc}"
                        if progress is None:
                            raise UpstreamUnavailable(f"The upstream at {self.url} {exc}.") from None
                        progress(LoadProgress(0.1, message))
                        time.sleep(START_RETRY_S)
                self._watcher = self._runner.submit(self._watch())
            except BaseException:
                self._shutdown()
                raise
            self._loaded = True
            log.info("remote engine: %s serves %r at %s (context %s); thinking budget: %s; chat template: %s",
                     self.kind.label, self.model, self.url, self.context_length or "unknown", self._budget_mode(),
                     self.template.source if self.template else "none")
            if progress is not None:
                progress(LoadProgress(1.0, f"upstream {self.url} ready: {self.kind.label}, {self.model}"))

    async def _open_clients(self) -> None:
        import httpx

        s = self.settings
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        # Proxies from the environment are for the internet, not for a server on this machine.
        trust_env = not is_loopback(self.url)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=s.max_concurrency)
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers, trust_env=trust_env,
            timeout=httpx.Timeout(connect=s.connect_timeout_s, read=s.read_timeout_s, write=s.read_timeout_s,
                                  pool=None),
            # Retries with backoff (0 s, 0.5 s, 1 s …) when connecting fails: nothing was sent yet.
            transport=httpx.AsyncHTTPTransport(retries=s.connect_retries, limits=limits, trust_env=trust_env),
        )
        self._probe_client = httpx.AsyncClient(
            base_url=self.url, headers=headers, trust_env=trust_env,
            timeout=httpx.Timeout(PROBE_TIMEOUT_S, connect=min(s.connect_timeout_s, PROBE_TIMEOUT_S)),
        )
        self._wake = asyncio.Event()

    async def _models(self) -> list[dict[str, Any]]:
        """The upstream's ``/models`` entries; raises _Waiting (try again) or BackendError (fix it)."""
        import httpx

        try:
            resp = await self._probe_client.get("/models")
        except httpx.TransportError as exc:
            slow = isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout)
            raise _Waiting(f"does not answer ({_transport_text(exc, PROBE_TIMEOUT_S)})", slow=slow) from None
        code = resp.status_code
        if code in (401, 403):
            raise BackendError(
                f"The upstream at {self.url} refuses our key (HTTP {code}): set remote.api_key to the key it expects "
                "(VT_REMOTE__API_KEY), or leave it empty for an upstream without one.")
        if code == 404:
            raise BackendError(
                f"{self.url}/models answered 404: remote.base_url must be the upstream's OpenAI-compatible root, "
                "ending in /v1 (e.g. http://127.0.0.1:8000/v1).")
        if code == 429 or code >= 500:
            raise _Waiting(f"answers HTTP {code} ({_error_text(resp.content)})")
        if code >= 400:
            raise BackendError(f"{self.url}/models answered HTTP {code}: {_error_text(resp.content)}")
        try:
            data = resp.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"{self.url}/models did not answer an OpenAI model list: is remote.base_url the "
                               "upstream's /v1 address?") from None
        return [card for card in data if isinstance(card, dict) and isinstance(card.get("id"), str)]

    async def _discover(self) -> None:
        cards = await self._models()
        if not cards:
            raise _Waiting("serves no model yet")
        ids = [c["id"] for c in cards]
        wanted = self.settings.model or ids[0]
        card = next((c for c in cards if c["id"] == wanted), None)
        if card is None:
            raise BackendError(f"The upstream at {self.url} serves no model {wanted!r}; it serves "
                               f"{', '.join(map(repr, ids))}: set remote.model to one of them (or leave it empty).")
        busy = _not_serving(card)
        if busy:
            raise _Waiting(busy)
        self.model = wanted
        self.kind = KINDS[self.settings.kind if self.settings.kind != "auto" else detect_kind(card)]
        self.context_length = _context_of(card)
        self.template = await self._find_template()

    async def _find_template(self) -> ChatTemplate | None:
        if not self.kind.completions:
            return None  # nothing to continue with: the upstream enforces its own budget
        if self.settings.chat_template:
            return LocalTemplate.from_path(Path(self.settings.chat_template).expanduser())
        folder = Path(self.manifest.model.path).expanduser()
        if folder.is_dir():
            try:
                found = LocalTemplate.from_path(folder)
            except BackendError as exc:
                log.warning("remote engine: not using the chat template in model.path (%s)", exc)
                found = None
            if found is not None:
                return found
        if self.kind.name == "llamacpp":
            return await UpstreamTemplate.probe(self._client, self.url)
        return None

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def capacity(self) -> int:
        return self.settings.max_concurrency

    @property
    def can_continue(self) -> bool:
        """Whether a reply whose thinking we close can be continued (budget, loop while thinking)."""
        return self.kind.completions and self.template is not None

    def _budget_mode(self) -> str:
        if self.kind.budget is not None:
            return f"passed to the {self.kind.label}" + (", ours as a safety net" if self.can_continue else "")
        if self.can_continue:
            return "enforced here (closed at the budget, then continued)"
        return ("not enforced (the upstream takes none per request and no chat template is known: set "
                "remote.chat_template)")

    def info(self) -> BackendInfo:
        template = self.template.source if self.template is not None else ""
        return BackendInfo(
            backend=self.name,
            model_id=self.model or self.manifest.model.id,
            model_path=self.url,
            device=f"upstream {self.url}",
            dtype=f"{self.kind.label}: {self.model}" if self.model else self.kind.label,
            context_length=self.context_length,
            reason=f"thinking budget {self._budget_mode()}",
            extra={"endpoint": self.url, "upstream_model": self.model, "kind": self.kind.name,
                   "chat_template": template, "max_concurrency": self.capacity},
        )

    # -- health -----------------------------------------------------------------------------
    def unavailable(self) -> str | None:
        problem = self._problem
        if not self._loaded or problem is None:
            return None
        reason, since = problem
        return (f"{reason}; for {time.monotonic() - since:.0f} s now, checked every second; requests get 503 until "
                "it answers again")

    def _set_problem(self, problem: str | None) -> None:
        before = self._problem
        if problem is None:
            if before is not None:
                log.info("upstream %s answers again after %.0f s", self.url, time.monotonic() - before[1])
            self._problem = None
            return
        if before is None:
            log.warning("upstream %s cannot serve: %s — new requests get 503 until it answers", self.url, problem)
            self._problem = (problem, time.monotonic())
        else:
            self._problem = (problem, before[1])

    async def _health(self) -> str | None:
        try:
            cards = await self._models()
        except _Waiting as exc:
            if exc.slow and time.monotonic() - self._last_data_at < BUSY_GRACE_S:
                # It streams to us but is slow to list its models: busy, not gone (llama-cpp-python's
                # server answers /models only between generations).
                return None
            return f"the upstream {self.url} {exc}"
        except BackendError as exc:
            return str(exc)
        card = next((c for c in cards if c["id"] == self.model), None)
        if card is None:
            return (f"the upstream {self.url} no longer serves {self.model!r} (it serves "
                    f"{', '.join(repr(c['id']) for c in cards) or 'nothing'})")
        busy = _not_serving(card)
        return f"the upstream {self.url} {busy}" if busy else None

    async def _watch(self) -> None:
        assert self._wake is not None
        while True:
            try:
                problem = await self._health()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any surprise
                problem = f"the upstream {self.url} health check failed: {type(exc).__name__}: {exc}"
            self._set_problem(problem)
            interval = DOWN_INTERVAL_S if problem else self.settings.health_interval_s
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _suspect(self, reason: str) -> None:
        """A request could not reach the upstream: refuse new ones now and let the watcher look."""
        self._set_problem(reason)
        if self._wake is not None:
            self._wake.set()

    # -- requests ---------------------------------------------------------------------------
    @staticmethod
    def _messages(request: GenerationRequest) -> tuple[ChatMessage, ...]:
        # An empty system message would replace the template's default maths prompt with nothing.
        kept = tuple(m for m in request.messages if not (m.role == "system" and not m.content.strip()))
        if not kept:
            raise RequestError("The request has only an empty system message; add a user message.")
        return kept

    def check(self, request: GenerationRequest) -> int | None:
        super().check(request)
        if not self._loaded:
            raise BackendError("The remote engine is not connected yet; call load() first (or wait until /health "
                               "is ready).")
        self._messages(request)
        problem = self.unavailable()
        if problem:
            raise UpstreamUnavailable(problem)
        return None

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        self.check(request)
        job = _Job(request, self._messages(request))
        with self._jobs_lock:
            if request.request_id in self._jobs:
                raise RequestError(f"Request id {request.request_id!r} is already in use; use a new id.")
            self._jobs[request.request_id] = job
        iterator = self._iterate(job)
        # A stream dropped without ever being started must not stay registered.
        weakref.finalize(iterator, self._forget, job)
        return iterator

    def _forget(self, job: _Job) -> None:
        with self._jobs_lock:
            if self._jobs.get(job.request.request_id) is job:
                del self._jobs[job.request.request_id]

    def _iterate(self, job: _Job) -> Iterator[StreamChunk]:
        runner = self._runner
        if runner is None:
            raise BackendError("The remote engine was closed.")
        try:
            runner.loop.call_soon_threadsafe(self._start, job)
            held: object | None = None
            while True:
                item, held = (held, None) if held is not None else (job.out.get(), None)
                if isinstance(item, _Done):
                    return
                if isinstance(item, _Failure):
                    raise item.error
                assert isinstance(item, StreamChunk)
                # Merge what has piled up (of the same sample): a slow reader gets fewer, larger chunks.
                while not item.final:
                    try:
                        nxt = job.out.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, StreamChunk) or nxt.index != item.index:
                        held = nxt
                        break
                    item = StreamChunk(reasoning=item.reasoning + nxt.reasoning, answer=item.answer + nxt.answer,
                                       usage=nxt.usage, boxed_answer=nxt.boxed_answer, index=item.index)
                yield item
        finally:
            # Stop, a closed tab, a dropped client: cancel the task, which closes the upstream request.
            self._cancel_soon(job)
            self._forget(job)

    def cancel(self, request_id: str) -> bool:
        with self._jobs_lock:
            job = self._jobs.get(request_id)
        if job is None or job.cancelled.is_set():
            return False
        self._cancel_soon(job)
        return True

    def _cancel_soon(self, job: _Job) -> None:
        job.cancelled.set()
        runner = self._runner
        if runner is not None:
            try:
                runner.loop.call_soon_threadsafe(self._cancel_task, job)
            except RuntimeError:  # the loop is closed: nothing runs any more
                pass

    # Callbacks on the I/O loop (call_soon_threadsafe keeps their order: a start always runs
    # before a cancel scheduled after it).
    def _start(self, job: _Job) -> None:
        if job.cancelled.is_set():
            self._task_done(job, None)
            return
        job.task = asyncio.ensure_future(self._serve(job))
        job.task.add_done_callback(lambda task: self._task_done(job, task))

    @staticmethod
    def _cancel_task(job: _Job) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()

    @staticmethod
    def _task_done(job: _Job, task: asyncio.Task | None) -> None:
        if task is None or task.cancelled():
            # Cancelled before its samples could end themselves: end them here.
            for index in range(job.request.n):
                if index not in job.finals:
                    job.emit(StreamChunk(index=index, usage=Usage(
                        finish_reason=FinishReason.CANCELLED, detail="cancelled before it started",
                        total_time_s=time.perf_counter() - job.started_at)))
            job.out.put(_DONE)
        elif task.exception() is not None:
            job.out.put(_Failure(task.exception()))
        else:
            job.out.put(_DONE)

    def cancel_all(self) -> int:
        with self._jobs_lock:
            ids = list(self._jobs)
        return sum(self.cancel(i) for i in ids)

    @property
    def pending_requests(self) -> int:
        with self._jobs_lock:
            return len(self._jobs)

    # -- one request, on the I/O loop ------------------------------------------------------------
    async def _serve(self, job: _Job) -> None:
        request = job.request
        params = request.params
        budget = params.thinking_budget
        budget_at = None
        if budget and self.can_continue:
            # A native budget closes the thinking at `budget` tokens on the upstream; ours only
            # steps in (a little later) when the upstream ignores it.
            budget_at = budget + (max(32, budget // 8) if self.kind.budget is not None else 0)
        if self.template is not None and self.template.local:
            job.prompt = await self.template.render(job.messages)
        opens_think = job.prompt is not None and job.prompt.rstrip().endswith("<think>")
        samples = [
            _Sample(TextReply(index=i, params=params, loop_guard=self.manifest.generation.loop_guard, emit=job.emit,
                              started_at=job.started_at, max_new=params.max_new_tokens, budget_at=budget_at,
                              prompt_opens_think=opens_think))
            for i in range(request.n)
        ]
        try:
            if request.n > 1 and self.kind.native_n and not self._split_n:
                await self._group(job, samples)
            else:
                await _gather_or_cancel([self._group(job, [s]) for s in samples])
        except asyncio.CancelledError:
            for s in samples:
                if not s.reply.done:
                    job.emit(s.reply.finish(FinishReason.CANCELLED, "cancelled", job.prompt_tokens))
            raise

    async def _group(self, job: _Job, samples: list[_Sample]) -> None:
        """Samples sharing one chat stream, then each one's continuations."""
        try:
            await self._chat(job, samples)
            await _gather_or_cancel([self._follow(job, s) for s in samples if not s.reply.done])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not job.emitted:
                raise
            # Text has streamed: end the samples with what they have and say why.
            detail = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
            log.warning("request %s: the upstream failed after streaming began: %s", job.request.request_id, detail)
            for s in samples:
                if not s.reply.done:
                    job.emit(s.reply.finish(FinishReason.ERROR, detail, job.prompt_tokens))

    def _sampling(self, params: SamplingParams, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p}
        if seed is not None:
            body["seed"] = seed
        body.update(self.kind.sampling(params))
        return body

    async def _chat(self, job: _Job, samples: list[_Sample]) -> None:
        params = job.request.params
        shared = len(samples) > 1
        seed = params.seed
        if seed is not None and not shared:
            seed += samples[0].reply.index
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in job.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._sampling(params, seed),
        }
        if not self._omit_max_tokens:
            body["max_tokens"] = params.max_new_tokens
        if shared:
            body["n"] = len(samples)
        if params.thinking_budget and self.kind.budget is not None:
            body.update(self.kind.budget(params.thinking_budget))
        body.update(self.settings.extra_body)  # the user's word wins
        for s in samples:
            s.streams += 1
            s.shared = shared
        usage: Any = None
        async with self._stream("/chat/completions", body) as events:
            async for event in events:
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                    job.prompt_tokens = int(usage.get("prompt_tokens") or job.prompt_tokens)
                for choice in event.get("choices") or ():
                    index = choice.get("index", 0)
                    s = samples[index] if isinstance(index, int) and 0 <= index < len(samples) else None
                    if s is None or not s.open:
                        continue
                    delta = choice.get("delta") or {}
                    cut = None
                    thought = delta.get("reasoning_content") or delta.get("reasoning")
                    if isinstance(thought, str) and thought:
                        cut = s.reply.feed_reasoning(thought)
                    text = delta.get("content")
                    if cut is None and isinstance(text, str) and text:
                        cut = s.reply.feed_content(text)
                    if cut is None and choice.get("finish_reason"):
                        s.finish = str(choice["finish_reason"])
                        extras = event.get("vibethinker")
                        s.extras = extras if isinstance(extras, dict) else None
                    if cut is not None and cut.action == CLOSE and not self.can_continue and not s.deferred:
                        # We cannot continue a reply whose thinking we close: leave the loop to the
                        # upstream's own guard (another vibethinker-app has one) or the model once;
                        # if it goes on as long again, the reply ends here.
                        s.deferred = True
                        s.reply.defer_loop()
                        cut = None
                    if cut is None:
                        continue
                    s.cut = cut
                    others = [o for o in samples if o is not s and o.open]
                    if not others:
                        return  # leaving the block closes the upstream request
                    if self.can_continue:
                        for o in others:
                            o.detached = True
                        return
                    # The others cannot continue on their own: read on for them and end this one
                    # now (the upstream finishes its text unseen).
                    await self._follow(job, s)
        if isinstance(usage, dict):
            _share_usage(samples, usage)

    async def _follow(self, job: _Job, s: _Sample) -> None:
        """After a stream: close the thinking and continue, continue a detached sample, or end."""
        reply = s.reply
        while not reply.done:
            if s.cut is not None:
                cut, s.cut = s.cut, None
                if cut.action == STOP:
                    job.emit(reply.finish(cut.reason, cut.detail, job.prompt_tokens))
                    return
                assert cut.action == CLOSE
                if not self.can_continue:
                    why = ("the upstream has no /v1/completions" if not self.kind.completions
                           else "no chat template is known: set remote.chat_template")
                    job.emit(reply.finish(cut.reason, f"{cut.detail}; generation stopped ({why})",
                                          job.prompt_tokens))
                    return
                reply.close_thinking(cut.reason, cut.detail)
                if reply.tokens_left <= 0:
                    job.emit(reply.finish(FinishReason.LENGTH, f"{cut.detail}, but no tokens were left for the "
                                          "answer", job.prompt_tokens))
                    return
                await self._continue(job, s)
                continue
            if s.finish is not None:
                self._settle(job, s)
                return
            if s.detached:
                s.detached = False
                if reply.tokens_left <= 0:
                    job.emit(reply.finish(FinishReason.LENGTH, f"reached the limit of {reply.max_new} new tokens",
                                          job.prompt_tokens))
                    return
                await self._continue(job, s)
                continue
            if s.shared and s.streams == 1 and reply.pieces == 0:
                # The upstream ignored n and sent one choice: ask for this sample on its own (and for
                # every sample from now on).
                if not self._split_n:
                    log.info("upstream %s answers one choice per request: sending one request per sample", self.url)
                    self._split_n = True
                await self._chat(job, [s])
                continue
            job.emit(reply.finish(FinishReason.ERROR, "the upstream ended the stream before the reply was complete",
                                  job.prompt_tokens))
            return

    async def _prompt(self, job: _Job) -> str:
        if job.prompt is None:
            assert self.template is not None
            job.prompt = await self.template.render(job.messages)
        return job.prompt

    async def _continue(self, job: _Job, s: _Sample) -> None:
        """Continue one sample through /v1/completions on the prompt + its text so far."""
        reply = s.reply
        params = job.request.params
        prompt = await self._prompt(job) + reply.continuation_text()
        left = reply.tokens_left
        if self.context_length:
            used = job.prompt_tokens or len(prompt) // CHARS_PER_TOKEN
            left = max(1, min(left, self.context_length - used - reply.pieces - 32))
        seed = params.seed + reply.index if params.seed is not None else None
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "stream": True, "max_tokens": left,
                                "stream_options": {"include_usage": True}, **self._sampling(params, seed)}
        body.update(self.settings.extra_body)
        s.finish, s.extras, s.exact = None, None, None
        s.streams += 1
        async with self._stream("/completions", body) as events:
            async for event in events:
                for choice in event.get("choices") or ():
                    text = choice.get("text")
                    if isinstance(text, str) and text:
                        cut = reply.feed_raw(text)
                        if cut is not None:
                            s.cut = cut
                            return
                    if choice.get("finish_reason"):
                        s.finish = str(choice["finish_reason"])

    def _settle(self, job: _Job, s: _Sample) -> None:
        """End a sample the upstream finished, with the local engines' finish reasons and details."""
        reply = s.reply
        params = job.request.params
        upstream = s.finish or ""
        if reply.forced:
            if upstream == "length":
                reason, detail = FinishReason.LENGTH, f"{reply.close_detail}; the answer reached the token limit"
            else:
                reason, detail = reply.close_reason, f"{reply.close_detail}; thinking closed and the answer written"
        else:
            theirs = (s.extras or {}).get("finish_reason")
            if theirs in ("budget", "loop", "length", "error") and s.extras:
                # Another vibethinker-app closed the thinking (its budget, its loop guard) itself.
                reason, detail = FinishReason(theirs), str(s.extras.get("detail", ""))
            elif upstream == "length":
                reason, detail = FinishReason.LENGTH, f"reached the limit of {reply.max_new} new tokens"
            elif upstream == "stop":
                reason, detail = FinishReason.STOP, ""
                budget = params.thinking_budget
                if budget and self.kind.budget is not None and reply.reasoning_pieces >= budget:
                    reason = FinishReason.BUDGET
                    detail = (f"thinking budget of {budget} tokens reached; the upstream closed the thinking and the "
                              "answer was written")
            elif upstream in ("abort", "cancelled"):
                reason, detail = FinishReason.ERROR, "the upstream aborted the reply"
            else:
                reason, detail = FinishReason.STOP, f"the upstream's finish_reason: {upstream}"
            budget = params.thinking_budget
            if budget and self.kind.budget is None and not self.can_continue and reply.reasoning_pieces > budget:
                detail = "; ".join(filter(None, [detail, f"thinking budget of {budget} not enforced: "
                                                 + self._budget_mode()]))
        exact = s.exact if s.streams == 1 and not reply.forced else None
        job.emit(reply.finish(reason, detail, job.prompt_tokens, exact))

    @asynccontextmanager
    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """POST a streaming request; yields its parsed SSE events. Errors before the first event
        become our error types (503 for an unreachable or busy upstream, 400 for a refused request)."""
        import httpx

        for attempt in (0, 1):
            try:
                async with self._client.stream("POST", path, json=body) as resp:
                    if resp.status_code >= 400:
                        message = _error_text(await resp.aread())
                        if (attempt == 0 and resp.status_code == 400 and "max_tokens" in body
                                and path == "/chat/completions" and _MAX_TOKENS_WORDS.search(message)):
                            # Some servers refuse prompt + max_tokens beyond their context: let them
                            # use the rest of it (our own count still ends the reply at the limit).
                            log.info("upstream refused max_tokens (%s); sending requests without it", message)
                            self._omit_max_tokens = True
                            body = {k: v for k, v in body.items() if k != "max_tokens"}
                            continue
                        raise self._http_error(resp.status_code, message, path)
                    yield self._events(resp)
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                why = _transport_text(exc, self.settings.connect_timeout_s)
                reason = f"the upstream {self.url} does not answer ({why})"
                self._suspect(reason)
                raise UpstreamUnavailable(f"{reason}; try again in a moment.") from None
            except httpx.ReadTimeout:
                raise BackendError(f"the upstream sent nothing for {self.settings.read_timeout_s:g} s "
                                   "(remote.read_timeout_s)") from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if self._wake is not None:
                    self._wake.set()  # it may have gone away: look now
                raise BackendError(f"the connection to the upstream broke ({exc or type(exc).__name__})") from None

    async def _events(self, resp: Any) -> AsyncIterator[dict[str, Any]]:
        async for line in resp.aiter_lines():
            self._last_data_at = time.monotonic()
            if not line.startswith("data:"):
                continue  # comments (pings), event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise BackendError(f"the upstream sent an event that is not JSON: {data[:200]!r}") from None
            if not isinstance(event, dict):
                continue
            if "error" in event:
                raise BackendError(f"the upstream reported an error: {_error_text(data)}")
            yield event

    def _http_error(self, code: int, message: str, path: str) -> BackendError:
        if code in (400, 413, 422):
            if _CONTEXT_WORDS.search(message):
                return ContextLengthExceeded(f"对话太长 / The upstream says the conversation is too long: "
                                             f"{message}. Start a new chat or shorten the messages.")
            return RequestError(f"The upstream refused the request (HTTP {code}): {message}")
        if code in (401, 403):
            return BackendError(f"The upstream refuses our key (HTTP {code}): set remote.api_key to the key it "
                                "expects.")
        if code in (429, 503):
            return UpstreamUnavailable(f"The upstream is busy (HTTP {code}: {message}); try again in a moment.")
        if code == 404:
            return BackendError(f"The upstream has no {path} for model {self.model!r} (HTTP 404: {message}).")
        return BackendError(f"The upstream failed (HTTP {code}): {message}")

    # -- closing ----------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return

        async def close_clients() -> None:
            for client in (self._client, self._probe_client):
                if client is not None:
                    await client.aclose()

        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        try:
            runner.call(close_clients(), timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        runner.stop()
        self._client = self._probe_client = None

    def close(self) -> None:
        self.cancel_all()
        with self._load_lock:
            self._loaded = False
            self._problem = None
            self._shutdown()


# -- registration ------------------------------------------------------------------------------

def remote_problem() -> str | None:
    try:
        import httpx  # noqa: F401
    except ImportError:
        return f"the remote engine needs httpx: {PIP_FIX}"
    return None


ENGINE = EngineSpec(
    name="remote",
    label="remote",
    summary="an OpenAI-compatible upstream at remote.base_url (vLLM, SGLang, llama-server, another vibethinker-app)",
    create=lambda manifest: RemoteBackend(manifest),
    needs_local_model=False,
    extras=("remote",),
    problem=remote_problem,
    auto_rank=None,  # never chosen by backend: auto — it needs an address only the user knows
)
