"""Many sequences at once on llama.cpp: continuous batching over llama-cpp-python's low-level API.

llama-cpp-python's high-level ``Llama.generate`` decodes one sequence (its batching tracker,
issues #771/#1549, is open), so this module drives llama.cpp the way llama-server's slots do:

- one context with ``parallel`` sequences and a **unified** KV cache of ``n_ctx × parallel``
  cells, so that every sequence can always reach its full ``n_ctx`` (what the manifest promises)
  and sequences that share a prompt share its cells (``llama_memory_seq_cp`` only tags cells);
- one scheduler thread that builds one ``llama_batch`` per step: the next token of every
  decoding sequence first, then prefill chunks of new prompts with what is left of ``n_batch``
  (a smaller chunk while others decode, so that a long prompt delays them by a chunk, not by its
  whole prefill);
- a sampler chain per sequence (temperature/top-p/top-k/seed of its own request), the same chain
  ``Llama.generate`` builds, so that one stream decodes exactly as the high-level API does;
- a slot keeps the KV of its last sequence as a prefix cache: the second phase after a forced
  ``</think>``, or a follow-up turn, evaluates only what is new; a new sequence takes the free
  slot with the longest common prefix, or copies the prompt from a sequence that has it (``n``
  samples of one request evaluate their prompt once); a cancelled or failed sequence's cells are
  removed at once.

The driver's contract is kept (``decode_loop``: one call per sequence, from its own worker
thread): :meth:`SequenceBatcher.run` queues the sequence and waits; the scheduler calls its
``on_token`` in order and ends it when that returns True, at ``max_tokens``, or on cancel.

Unified KV has a cost measured in docs/PERFORMANCE.md: each token's attention spans the cells in
use by all sequences (masked), which grows with N × reply length; per-sequence KV streams avoid
that but copy prompts instead of sharing them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..types import SamplingParams

log = logging.getLogger(__name__)

# Largest prefill chunk while other sequences are decoding (tokens): each step waits for the
# chunk, so this bounds the pause a new prompt causes the others (~1-2 s on two CPU cores).
BUSY_PREFILL_CHUNK = 128
# A new sequence waits for another one still evaluating the same prompt when it would share at
# least this many more tokens than it can reuse now (n samples of one request).
SHARE_MIN_TOKENS = 16
# How often a waiting sequence looks at its cancel flag and the scheduler's health.
POLL_S = 0.05


@dataclass(frozen=True)
class BatchSettings:
    parallel: int  # sequences decoded together
    n_ctx: int  # context window of ONE sequence (tokens)
    n_batch: int  # most tokens in one llama_decode
    n_ubatch: int
    threads: int
    flash_attn: bool
    kv_type: int  # GGML_TYPE_*

    @property
    def cells(self) -> int:
        """KV cells of the unified cache: room for every sequence's full window."""
        return self.n_ctx * self.parallel


def kv_cache_bytes(llama_cpp: Any, model: Any, cells: int, kv_type: int) -> int:
    """Bytes the KV cache of ``cells`` tokens takes for this model (keys and values, all layers)."""
    n_layer = int(llama_cpp.llama_model_n_layer(model))
    n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model)) or n_head
    head_dim = int(llama_cpp.llama_model_n_embd(model)) // n_head
    per_value = {llama_cpp.GGML_TYPE_F16: 2.0, llama_cpp.GGML_TYPE_Q8_0: 34 / 32,
                 llama_cpp.GGML_TYPE_Q4_0: 18 / 32}.get(kv_type, 2.0)
    return int(n_layer * cells * 2 * n_head_kv * head_dim * per_value)


@dataclass
class _Sequence:
    """One ``decode_loop`` call: a prompt to evaluate and tokens to hand to ``on_token``."""

    ids: list[int]
    params: SamplingParams
    max_tokens: int
    on_token: Callable[[int], bool]
    request_cancelled: Callable[[], bool]  # the request's flag, readable from the scheduler thread
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Held while the scheduler calls on_token, so that a sequence given up by its worker never
    # hands out a token after its worker returned.
    guard: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    error: BaseException | None = None
    produced: int = 0


@dataclass
class _Slot:
    """A llama.cpp sequence id, the tokens its KV cells hold, and the sequence using it."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens at positions 0 … len-1
    job: _Sequence | None = None
    next_prompt: int = 0  # index in job.ids of the next prompt token to evaluate
    pending: int | None = None  # sampled token not yet evaluated
    sampler: Any = None
    last_used: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.job is not None and self.next_prompt < len(self.job.ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class BatchStats:
    """What the scheduler did (for info(), tests and the benchmark)."""

    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens evaluated (a shared or cached prefix is not counted)
    shared_tokens: int = 0  # prompt tokens copied from another sequence instead
    cached_tokens: int = 0  # prompt tokens reused from a slot's own cache
    most_decoding: int = 0  # the largest number of sequences that decoded in one step


class SequenceBatcher:
    """Owns one llama.cpp context for ``parallel`` sequences and the thread that decodes them."""

    def __init__(self, llama_cpp: Any, model: Any, settings: BatchSettings) -> None:
        self._lib = llama_cpp
        self.settings = settings
        fields = {f[0] for f in llama_cpp.llama_batch._fields_}
        if not {"n_tokens", "token", "pos", "n_seq_id", "seq_id", "logits"} <= fields:
            raise RuntimeError(f"this llama-cpp-python's llama_batch has fields {sorted(fields)}, not the ones "
                               "the batch engine writes; install llama-cpp-python 0.3.16 or later")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.cells
        params.n_batch = settings.n_batch
        params.n_ubatch = min(settings.n_batch, settings.n_ubatch)
        params.n_seq_max = settings.parallel
        params.n_threads = settings.threads
        params.n_threads_batch = settings.threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.type_k = settings.kv_type
        params.type_v = settings.kv_type
        params.kv_unified = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"failed to create the llama.cpp context for {settings.parallel} sequence(s) × "
                               f"{settings.n_ctx} tokens")
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(settings.n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(settings.parallel)]
        self._inbox: list[_Sequence] = []
        self._waiting: list[_Sequence] = []  # admitted in arrival order as slots allow
        self._cond = threading.Condition()
        self._stop = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name="vt-llamacpp-batch", daemon=True)
        self._thread.start()

    # -- the worker's side --------------------------------------------------------------------------
    def run(self, ids: list[int], params: SamplingParams, max_tokens: int,
            on_token: Callable[[int], bool], cancelled: Callable[[], bool]) -> None:
        """Decode ``ids`` in the shared batch (the driver's ``decode_loop`` contract)."""
        if max_tokens <= 0:
            return
        if not ids:
            raise ValueError("an empty prompt cannot be decoded")
        job = _Sequence(list(ids), params, max_tokens, on_token, cancelled)
        with self._cond:
            if self._stop:
                raise RuntimeError("the llama.cpp engine is closed")
            self._inbox.append(job)
            self._cond.notify()
        while not job.done.wait(POLL_S):
            if cancelled():
                # Give the sequence up now: the scheduler frees its slot at the next step and
                # calls its on_token no more (the guard makes that exact).
                with job.guard:
                    job.abandoned = True
                job.cancelled.set()
                self._wake()
                return
            if not self._thread.is_alive():
                raise RuntimeError("the llama.cpp batch loop stopped; restart the app")
        if job.error is not None:
            raise job.error

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def running(self) -> int:
        """Sequences holding a slot now."""
        return sum(1 for s in self._slots if s.job is not None)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(30)
        if self._thread.is_alive():
            log.warning("the llama.cpp batch loop did not stop within 30 s; its context is left allocated")
            return
        for slot in self._slots:
            self._free_sampler(slot)
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
        self._ctx = None

    # -- the scheduler ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._inbox and not self._work_left():
                    self._cond.wait()
                if self._stop:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._retire_cancelled()
                self._admit()
                if any(s.job is not None for s in self._slots):
                    self._step()
                elif self._waiting:
                    # Only sequences waiting for a source that went away: admit them next round.
                    time.sleep(0.001)
            except Exception as exc:  # noqa: BLE001 - every sequence in the batch is told
                log.exception("llama.cpp batch step failed")
                for slot in self._slots:
                    if slot.job is not None:
                        self._finish(slot, error=RuntimeError(f"llama.cpp decoding failed: {exc}"))
        for job in self._inbox + self._waiting:
            job.error = RuntimeError("the llama.cpp engine was closed")
            job.done.set()
        for slot in self._slots:
            if slot.job is not None:
                self._finish(slot, error=RuntimeError("the llama.cpp engine was closed"))

    def _work_left(self) -> bool:
        return bool(self._waiting) or any(s.job is not None for s in self._slots)

    def _retire_cancelled(self) -> None:
        for slot in self._slots:
            if slot.job is not None and (slot.job.cancelled.is_set() or slot.job.request_cancelled()):
                self._finish(slot, drop_cells=True)
        still: list[_Sequence] = []
        for job in self._waiting:
            if job.cancelled.is_set():
                job.done.set()
            else:
                still.append(job)
        self._waiting = still

    def _admit(self) -> None:
        still: list[_Sequence] = []
        for job in self._waiting:
            if not self._place(job):
                still.append(job)
        self._waiting = still

    def _place(self, job: _Sequence) -> bool:
        """Give ``job`` a slot (reusing the longest prefix it can), or leave it waiting."""
        free = [s for s in self._slots if s.job is None]
        if not free:
            return False
        own = max(free, key=lambda s: (_common_prefix(s.cached, job.ids), -s.last_used))
        own_common = _common_prefix(own.cached, job.ids)
        source, source_common = None, own_common
        for slot in self._slots:
            if slot.job is None:
                continue
            ready = _common_prefix(slot.cached, job.ids)
            if slot.prefilling and _common_prefix(slot.job.ids, job.ids) >= max(ready, own_common) + SHARE_MIN_TOKENS:
                return False  # it is evaluating our prompt: wait and share it
            if ready > source_common:
                source, source_common = slot, ready
        lib, mem = self._lib, self._memory
        if source is not None:
            # Take the free slot whose cache is worth least, and tag the source's cells as ours too.
            target = min(free, key=lambda s: (len(s.cached), s.last_used))
            keep = min(source_common, len(job.ids) - 1)
            lib.llama_memory_seq_rm(mem, target.seq_id, 0, -1)
            lib.llama_memory_seq_cp(mem, source.seq_id, target.seq_id, 0, keep)
            target.cached = source.cached[:keep]
            self.stats.shared_tokens += keep
        else:
            target = own
            keep = min(own_common, len(job.ids) - 1)
            if not lib.llama_memory_seq_rm(mem, target.seq_id, keep, -1):
                lib.llama_memory_seq_rm(mem, target.seq_id, 0, -1)  # a partial removal was refused
                keep = 0
            target.cached = target.cached[:keep]
            self.stats.cached_tokens += keep
        target.job = job
        target.next_prompt = keep
        target.pending = None
        target.sampler = self._sampler(job.params)
        target.last_used = time.monotonic()
        return True

    def _sampler(self, params: SamplingParams) -> Any:
        # The chain Llama.generate builds (its penalties, typical-p and min-p are no-ops at our values).
        lib = self._lib
        chain_params = lib.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = lib.llama_sampler_chain_init(chain_params)
        if params.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(int(params.top_k)))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(float(params.top_p), 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(float(params.temperature)))
        seed = params.seed if params.seed is not None else lib.LLAMA_DEFAULT_SEED
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(int(seed) & 0xFFFFFFFF))
        return chain

    def _free_sampler(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self._lib.llama_sampler_free(slot.sampler)
            slot.sampler = None

    def _finish(self, slot: _Slot, *, error: BaseException | None = None, drop_cells: bool = False) -> None:
        job = slot.job
        self._free_sampler(slot)
        if error is not None or drop_cells:
            self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
            slot.cached = []
        slot.job, slot.pending = None, None
        slot.last_used = time.monotonic()
        if job is not None:
            job.error = job.error or error
            job.done.set()

    def _step(self) -> None:
        s = self.settings
        batch = self._batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []  # (slot, batch index whose logits it samples)
        added: list[tuple[_Slot, list[int]]] = []

        def add(slot: _Slot, tokens: list[int], logits_last: bool) -> None:
            nonlocal n
            pos = len(slot.cached)
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = 1 if (logits_last and j == len(tokens) - 1) else 0
                n += 1
            if logits_last:
                outputs.append((slot, n - 1))
            added.append((slot, tokens))

        decoding = [sl for sl in self._slots if sl.job is not None and sl.pending is not None]
        for slot in decoding:
            add(slot, [slot.pending], True)
        budget = s.n_batch - n
        if decoding:
            budget = min(budget, BUSY_PREFILL_CHUNK)
        for slot in sorted((sl for sl in self._slots if sl.prefilling), key=lambda sl: sl.last_used):
            if budget <= 0:
                break
            job = slot.job
            chunk = job.ids[slot.next_prompt:slot.next_prompt + budget]
            completes = slot.next_prompt + len(chunk) == len(job.ids)
            add(slot, chunk, completes)
            slot.next_prompt += len(chunk)
            self.stats.prompt_tokens += len(chunk)
            budget -= len(chunk)
        if n == 0:
            return
        batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            why = {1: "no room left in the KV cache (raise llamacpp.n_ctx or lower llamacpp.parallel)",
                   2: "aborted"}.get(rc, f"llama_decode returned {rc}")
            for slot, _ in added:
                if slot.job is not None:
                    self._finish(slot, error=RuntimeError(f"llama.cpp could not decode: {why}"))
            return
        for slot, tokens in added:
            slot.cached.extend(tokens)
            slot.pending = None
        self.stats.steps += 1
        self.stats.most_decoding = max(self.stats.most_decoding, len(decoding))
        for slot, index in outputs:
            job = slot.job
            if job is None:
                continue
            token = int(self._lib.llama_sampler_sample(slot.sampler, self._ctx, index))
            job.produced += 1
            with job.guard:
                if job.abandoned:
                    stop = True
                else:
                    try:
                        stop = bool(job.on_token(token))
                    except Exception as exc:  # noqa: BLE001 - raised in the sequence's worker
                        self._finish(slot, error=exc)
                        continue
            if stop or job.produced >= job.max_tokens or job.cancelled.is_set():
                # A cancelled sequence's cells go at once; a finished one's stay as a prefix cache.
                self._finish(slot, drop_cells=job.abandoned or job.request_cancelled())
            else:
                slot.pending = token

