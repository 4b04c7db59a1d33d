"""Many users on the transformers engine: transformers' own continuous batching, driven per request.

transformers 5 ships a continuous-batching manager (paged KV cache, a scheduler and a background
thread that decodes every active request in one forward pass per step). We do not schedule
anything ourselves: :class:`BatchRunner` owns one manager for the loaded model, routes its streamed
outputs to the request that asked for them, and gives the shared driver the same per-token
``decode_loop`` contract as the one-at-a-time path, so streaming, the ``<think>`` split, the thinking
budget (a follow-up request with prompt + generated + closing ids), the loop guard, cancellation and
usage all stay in :mod:`backends.driver`.

What the manager cannot do per request, and how we stay honest about it:
- sampling mode: the manager samples for every request (``do_sample`` is one switch); a greedy
  request (temperature 0) is sent with ``top_k=1``, which keeps only the arg-max token, so it is
  greedy except for exact ties of the top logits (the exclusive path picks the first of them);
- seed: the manager draws from torch's one global random generator; a request with a fixed seed
  cannot be reproduced inside a batch, so :meth:`BatchRunner.supports` refuses it and the engine
  decodes it on its own while the batch is paused (:meth:`BatchRunner.paused`): reproducible, but
  batched users get no tokens meanwhile (see ``TransformersBackend.decode_loop``).
"""
from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..types import ContextLengthExceeded, SamplingParams

log = logging.getLogger(__name__)

# The manager's own page size is 256 tokens; smaller pages waste less of the shared cache at the
# end of each request, which matters when a few long replies share it.
PAGE_SIZE = 128
# How often a request waiting for its next token looks at its cancel flag and the manager's health
# (the manager's own idle wait is 0.1 s).
POLL_S = 0.05


@dataclass(frozen=True)
class BatchSettings:
    capacity: int  # requests decoded together (server.concurrency)
    cache_tokens: int  # KV cache shared by the batch, in tokens
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def cache_tokens_for(capacity: int, max_new_tokens: int, context_length: int, configured: int,
                     memory_tokens: int | None = None) -> int:
    """Size of the shared KV cache: ``configured`` if set, else room for ``capacity`` full replies,
    capped by ``memory_tokens`` (what fits in the memory set aside for it: the streams then share
    the cache, and the manager admits what fits).

    A single request must always fit (the manager raises a fatal error when one request alone
    exceeds the cache), so the result is never below one page more than the longest request can be.
    """
    per_request = min(context_length, max_new_tokens + 4096)
    wanted = configured if configured > 0 else capacity * per_request
    if configured <= 0 and memory_tokens is not None:
        wanted = min(wanted, memory_tokens)
    return max(wanted, min(context_length, per_request) + PAGE_SIZE)


class BatchRunner:
    """One continuous-batching manager for one loaded model; thread-safe ``run`` per request."""

    def __init__(self, model: Any, settings: BatchSettings) -> None:
        self._model = model
        self.settings = settings
        self._manager: Any = None
        self._routes: dict[str, queue.Queue] = {}
        self._routes_lock = threading.Lock()
        self._stop = threading.Event()
        self._router: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------------
    @staticmethod
    def supports(params: SamplingParams) -> bool:
        """Whether a request can share the batch (a fixed seed needs its own random generator)."""
        return params.seed is None

    @property
    def max_request_tokens(self) -> int:
        """Prompt + new tokens one request may use: the whole cache less a page of slack."""
        return self.settings.cache_tokens - PAGE_SIZE

    def start(self) -> None:
        """Create and start the manager (idempotent), and the thread routing its outputs."""
        with self._start_lock:
            if self._manager is not None and self._manager.is_running():
                return
            self._shutdown_manager()
            from transformers import GenerationConfig
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            s = self.settings
            # One generation config for the whole batch. Temperature, top-p and top-k values here
            # only make the manager create the three per-request warpers (a value of None/1.0/off
            # would create none); every request then sends its own three values.
            config = GenerationConfig(
                do_sample=True,
                temperature=0.5,
                top_p=0.5,
                top_k=s.vocab_size,
                max_new_tokens=s.cache_tokens,
                eos_token_id=list(s.eos_token_ids),
                pad_token_id=s.pad_token_id,
            )
            blocks = -(-s.cache_tokens // PAGE_SIZE)
            cb_config = ContinuousBatchingConfig(
                page_size=PAGE_SIZE,
                num_blocks=blocks,
                # Explicit sizes keep the manager from taking 80-90 % of free GPU memory, which
                # the seeded (one-at-a-time) path beside it also needs.
                max_batch_tokens=max(1024, s.capacity * 2),
                max_requests_per_batch=max(1, s.capacity),
                per_request_processors=True,
                # Keep the attention the manifest chose: the exclusive path shares the model.
                auto_switch_to_flash=False,
            )
            manager = self._model.init_continuous_batching(
                generation_config=config, continuous_batching_config=cb_config
            )
            manager.start()
            self._manager = manager
            self._stop.clear()
            self._router = threading.Thread(target=self._route, name="vt-batch-router", daemon=True)
            self._router.start()

    def warm_up(self, ids: Sequence[int]) -> None:
        """Decode two tokens once so that the first user does not pay the manager's set-up."""
        self.run(list(ids), SamplingParams(temperature=0.0), 2, lambda _token: False, lambda: False)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the batch between two steps (its requests keep their cache and resume after).

        The seeded path samples from torch's global generator, which the batch loop also draws
        from: pausing the loop keeps a seeded reply reproducible.
        """
        manager = self._manager
        if manager is None or not manager.is_running():
            yield
            return
        with manager.pause():
            yield

    def close(self) -> None:
        with self._start_lock:
            self._shutdown_manager()

    def _shutdown_manager(self) -> None:
        self._stop.set()
        if self._router is not None:
            self._router.join()
            self._router = None
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                # Requests still inside are failed (their readers were cancelled by the driver).
                manager.stop(block=True, timeout=30, hard_stop=True)
            finally:
                manager.destroy()

    # -- outputs ----------------------------------------------------------------------------------
    def _route(self) -> None:
        """Hand each streamed output to its request's queue (one reader for the manager's queue)."""
        manager = self._manager
        while not self._stop.is_set():
            out = manager.get_result(timeout=0.1)
            if out is None:
                if not manager.is_running():
                    # get_result returns at once when the loop is gone: do not spin.
                    self._stop.wait(0.1)
                continue
            with self._routes_lock:
                inbox = self._routes.get(out.request_id)
            if inbox is not None:  # outputs of a request we already left are dropped
                inbox.put(out)

    def _sampling(self, params: SamplingParams) -> dict[str, Any]:
        if params.temperature <= 0:
            # Greedy inside a sampling batch: only the arg-max token survives top-k 1.
            return {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
        top_k = params.top_k if params.top_k > 0 else self.settings.vocab_size
        return {"temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": int(top_k)}

    def _failure(self, manager: Any) -> str:
        fatal = getattr(getattr(manager, "background_thread_status", None), "fatal_error", None)
        return f"the batch decoding loop stopped ({fatal})" if fatal else "the batch decoding loop stopped"

    # -- one request ------------------------------------------------------------------------------
    def run(self, ids: list[int], params: SamplingParams, max_tokens: int,
            on_token: Callable[[int], bool], cancelled: Callable[[], bool]) -> None:
        """Decode ``ids`` in the shared batch, calling ``on_token`` per new token (the driver's
        ``decode_loop`` contract); returns when it says stop, at end of reply, or on cancel."""
        if len(ids) + max_tokens > self.max_request_tokens:
            max_tokens = self.max_request_tokens - len(ids)
            if max_tokens <= 0:
                raise ContextLengthExceeded(
                    f"The conversation is {len(ids)} tokens but the batch cache holds {self.max_request_tokens} per "
                    f"request: raise transformers.batch_cache_tokens in manifest.yaml or start a new chat."
                )
        self.start()  # restarts a manager whose loop died on an earlier error
        manager = self._manager
        request_id = f"vt-{uuid.uuid4().hex}"
        inbox: queue.Queue = queue.Queue()
        with self._routes_lock:
            self._routes[request_id] = inbox
        finished = False
        try:
            added = manager.add_request(
                list(ids),
                request_id=request_id,
                max_new_tokens=max_tokens,
                streaming=True,
                eos_token_id=list(self.settings.eos_token_ids),
                **self._sampling(params),
            )
            if added is None:
                raise RuntimeError(self._failure(manager) + "; the request was not accepted")
            seen = 0
            while True:
                try:
                    out = inbox.get(timeout=POLL_S)
                except queue.Empty:
                    if cancelled():
                        return
                    if not manager.is_running():
                        raise RuntimeError(self._failure(manager)) from None
                    continue
                if out.error is not None:
                    finished = True  # the manager already dropped it
                    raise RuntimeError(f"batch decoding failed: {out.error}")
                tokens = out.generated_tokens
                while seen < len(tokens):
                    token = int(tokens[seen])
                    seen += 1
                    if on_token(token):
                        finished = out.is_finished()
                        return
                if out.is_finished():
                    finished = True
                    return
        finally:
            with self._routes_lock:
                self._routes.pop(request_id, None)
            if not finished:
                # Stops it at the manager's next step and frees its cache blocks.
                manager.cancel_request(request_id)
