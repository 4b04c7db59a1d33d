"""The llama.cpp engine (llama-cpp-python): a GGUF on the CPU, or offloaded to a CUDA GPU.

Only loading and the engine hooks live here; queueing, the ``<think>`` split, the thinking budget,
the loop guard and usage are the shared driver's (:class:`backends.driver.EngineBackend`).
Decoding goes through :mod:`.llamacpp_batch` (``llamacpp.parallel`` sequences at once, continuous
batching); the high-level ``Llama`` object only loads the weights and tokenizes.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..base import ProgressCallback
from ..models.checks import check_hf_folder, inspect_model_folder, require_gguf, verify_sha256
from ..driver import EngineBackend
from ..hardware import physical_cores
from .llamacpp_batch import BatchSettings, SequenceBatcher, kv_cache_bytes
from ..models.gguf_source import NotEnoughDisk, ensure_gguf, plan_gguf
from ..config import Manifest
from ..registry import AutoContext, AutoRank, EngineSpec
from ..types import BackendError, BackendInfo, ChatMessage, EngineUnavailable, LoadProgress, SamplingParams

log = logging.getLogger(__name__)

PIP_FIX = 'pip install "llama-cpp-python>=0.3.16"'
# The high-level Llama object's own context is never decoded in (the batch engine has its own):
# the smallest that llama.cpp accepts keeps its memory negligible.
_TOKENIZER_CTX = 256
# CUDA build of llama-cpp-python (compiles for several minutes; needs the CUDA toolkit's nvcc).
PIP_CUDA_FIX = 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir "llama-cpp-python>=0.3.16"'


class LlamaCppUnavailable(EngineUnavailable):
    """llama-cpp-python is missing or cannot be imported (``backend: auto`` falls back on it)."""


def _keep_weights_out_of_amx(llama_cpp: Any) -> None:
    """Load every model with ``use_extra_bufts = False`` when this build runs llama.cpp's AMX kernels.

    Why: on AMX CPUs (Intel Sapphire Rapids and later, common in cloud notebooks) the AMX matrix
    multiply of this llama.cpp crashes the process (SIGSEGV in ``ggml_backend_amx_mul_mat``,
    llama.cpp issue #20824) — reproduced here with Q8_0 GGUFs, the tiny test model and a 1.5B
    alike. Keeping the weights out of the AMX buffer avoids it; CPUs without AMX keep their weight
    repacking. llama-cpp-python's ``Llama`` has no parameter for it, so its default is changed.
    """
    info = llama_cpp.llama_print_system_info()
    info = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    if "AMX_INT8 = 1" not in info:
        return
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params
    if getattr(original, "_vt_no_amx", False):
        return

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    default_params._vt_no_amx = True  # type: ignore[attr-defined]
    low.llama_model_default_params = default_params
    llama_cpp.llama_model_default_params = default_params
    log.info("llama.cpp: AMX CPU — weights stay out of the AMX buffer (llama.cpp #20824)")


def import_llama_cpp() -> Any:
    """``import llama_cpp`` or a BackendError with the pip command that fixes it."""
    try:
        import llama_cpp
    except ImportError as exc:  # also a broken shared library (OSError is wrapped by the package)
        raise LlamaCppUnavailable(
            f"The llama.cpp backend needs llama-cpp-python, which cannot be imported ({exc}). "
            f"Install it: {PIP_FIX} (or pip install -e '.[llamacpp]'); or use backend: transformers."
        ) from None
    except OSError as exc:
        raise LlamaCppUnavailable(
            f"llama-cpp-python is installed but its library does not load ({exc}). Reinstall it: "
            f"pip install --force-reinstall --no-cache-dir llama-cpp-python; or use backend: transformers."
        ) from None
    _keep_weights_out_of_amx(llama_cpp)
    return llama_cpp


_QUIET_CALLBACK: Any = None


def _quiet_log_callback(llama_cpp: Any) -> Any:
    """After loading: llama.cpp warnings/errors go to Python logging. (llama-cpp-python's own
    callback decodes strictly and raises inside ctypes when a log line splits a UTF-8 character.)"""
    global _QUIET_CALLBACK
    if _QUIET_CALLBACK is None:
        engine_log = logging.getLogger("llama_cpp")
        last = [0]

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            level = last[0] if level == 5 else level
            last[0] = level
            if level in (3, 4):
                engine_log.log(logging.ERROR if level == 4 else logging.WARNING, "%s",
                               text.decode("utf-8", "replace").rstrip())

        _QUIET_CALLBACK = callback  # module-level: ctypes must never see it freed
    return _QUIET_CALLBACK


class _LogCapture:
    """Collects llama.cpp's own log lines while a model loads: with verbose off, its reason for a
    failed load is otherwise lost, and the user sees only "failed to load model"."""

    def __init__(self, llama_cpp: Any) -> None:
        self._llama_cpp = llama_cpp
        self.lines: deque[str] = deque(maxlen=40)
        self._callback: Any = None

    def __enter__(self) -> _LogCapture:
        lines = self.lines
        keep = [False]

        @self._llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
            if level != 5:
                keep[0] = level in (3, 4)
            if keep[0]:
                lines.append(text.decode("utf-8", "replace").rstrip())

        self._callback = callback  # keep a reference: ctypes must not free it while installed
        self._llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        self._llama_cpp.llama_log_set(_quiet_log_callback(self._llama_cpp), ctypes.c_void_p(0))

    def tail(self, n: int = 4) -> str:
        useful = [line for line in self.lines if line]
        return " | ".join(useful[-n:])


class LlamaCppBackend(EngineBackend):
    name = "llamacpp"

    def __init__(self, manifest: Manifest, *, allow_convert: bool = True) -> None:
        super().__init__(manifest, capacity=manifest.llamacpp_parallel())
        self.allow_convert = allow_convert
        self._llm: Any = None
        self._batcher: SequenceBatcher | None = None
        self._path: Path | None = None
        self._template: Any = None
        self._template_vars: dict[str, Any] = {}
        self._add_bos = False
        self._gpu_layers = 0
        self._threads = 0
        self._quant = ""
        self._load_lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------
    def _gpu_layers_for(self, llama_cpp: Any) -> int:
        wanted = self.manifest.llamacpp.n_gpu_layers
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        if wanted == "auto":
            return -1 if offload else 0
        if wanted != 0 and not offload:
            raise BackendError(
                f"llamacpp.n_gpu_layers is {wanted}, but this llama-cpp-python is a CPU-only build that cannot "
                f"offload layers to a GPU. Set llamacpp.n_gpu_layers: 0 (or auto), or install the CUDA build: "
                f"{PIP_CUDA_FIX}"
            )
        return int(wanted)

    def load(self, progress: ProgressCallback | None = None) -> None:
        with self._load_lock:
            if self._llm is not None:
                return
            llama_cpp = import_llama_cpp()
            if self.manifest.model.sha256:
                verify_sha256(self.manifest.model.path, self.manifest.model.sha256)
            path = ensure_gguf(self.manifest, progress, allow_convert=self.allow_convert)
            cfg = self.manifest.llamacpp
            gpu_layers = self._gpu_layers_for(llama_cpp)
            threads = cfg.n_threads or physical_cores()
            flash = cfg.flash_attn == "on" or (
                cfg.flash_attn == "auto" and (gpu_layers != 0 or cfg.kv_cache_type != "f16")
            )
            if cfg.kv_cache_type != "f16" and cfg.flash_attn == "off":
                raise BackendError(
                    f"llamacpp.kv_cache_type {cfg.kv_cache_type} needs flash attention: set llamacpp.flash_attn: "
                    "auto (or on), or kv_cache_type: f16."
                )
            kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                       "q4_0": llama_cpp.GGML_TYPE_Q4_0}[cfg.kv_cache_type]
            if progress is not None:
                progress(LoadProgress(0.95, f"Loading {path.name} with llama.cpp…"))
            settings = BatchSettings(parallel=self.capacity, n_ctx=cfg.n_ctx, n_batch=cfg.n_batch,
                                     n_ubatch=cfg.n_ubatch, threads=threads, flash_attn=flash, kv_type=kv_type)
            with _LogCapture(llama_cpp) as capture:
                llm = batcher = None
                try:
                    llm = llama_cpp.Llama(
                        model_path=str(path),
                        n_gpu_layers=gpu_layers,
                        n_ctx=_TOKENIZER_CTX,
                        n_batch=_TOKENIZER_CTX,
                        n_threads=threads,
                        n_threads_batch=threads,
                        verbose=False,
                    )
                    if gpu_layers == 0:
                        self._check_kv_memory(llama_cpp, llm.model, settings)
                    batcher = SequenceBatcher(llama_cpp, llm.model, settings)
                except (ValueError, RuntimeError, OSError) as exc:
                    if llm is not None:
                        llm.close()
                    said = capture.tail()
                    if "context" in str(exc):
                        fix = ("the model loaded but its context could not be created: lower llamacpp.n_ctx or "
                               f"llamacpp.parallel (now {cfg.n_ctx} tokens × {self.capacity} sequences), or change "
                               "llamacpp.kv_cache_type / flash_attn")
                    else:
                        fix = "the file may be corrupt or truncated: copy or convert it again"
                    raise BackendError(
                        f"llama.cpp could not load {path}: {exc}"
                        + (f" (llama.cpp says: {said})" if said else "")
                        + f"; {fix}."
                    ) from None
            self._batcher = batcher
            self._setup(llm, llama_cpp, path, gpu_layers, threads)
            if progress is not None:
                progress(LoadProgress(1.0, f"llama.cpp ready: {self.info().device}, {self._quant}"))

    def _check_kv_memory(self, llama_cpp: Any, model: Any, settings: BatchSettings) -> None:
        """Refuse a KV cache that cannot fit in RAM, naming the keys that size it (llama.cpp would
        allocate it and the machine would swap or be killed)."""
        import psutil

        need = kv_cache_bytes(llama_cpp, model, settings.cells, settings.kv_type)
        free = psutil.virtual_memory().available
        if need > 0.9 * free:
            cfg = self.manifest.llamacpp
            gib = 1 << 30
            raise BackendError(
                f"内存不足 / Not enough memory for the KV cache: llamacpp.parallel {settings.parallel} × "
                f"llamacpp.n_ctx {settings.n_ctx} tokens with kv_cache_type {cfg.kv_cache_type} needs "
                f"{need / gib:.1f} GiB, and {free / gib:.1f} GiB is available. Lower llamacpp.n_ctx or "
                "llamacpp.parallel (or server.concurrency when parallel is auto), or set llamacpp.kv_cache_type: "
                "q8_0 (half the memory)."
            )

    def _setup(self, llm: Any, llama_cpp: Any, path: Path, gpu_layers: int, threads: int) -> None:
        import gguf
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        meta: dict[str, str] = dict(llm.metadata)
        template_text = meta.get("tokenizer.chat_template")
        if not template_text:
            self._close_engine(llm)
            raise BackendError(
                f"{path} has no chat template (tokenizer.chat_template). Convert the checkpoint again with "
                "scripts/convert_to_gguf.py, which keeps it."
            )

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template_text)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n_vocab = llm.n_vocab()

        def token_text(i: int) -> str:
            return llm.detokenize([i], special=True).decode("utf-8", "replace") if 0 <= i < n_vocab else ""

        self._template_vars = {"bos_token": token_text(llm.token_bos()), "eos_token": token_text(llm.token_eos())}
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.eos_token_ids = frozenset(i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i))
        self.context_length = self.manifest.llamacpp.n_ctx
        try:
            self._quant = gguf.LlamaFileType(int(meta.get("general.file_type", "0"))).name
            self._quant = self._quant.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            self._quant = f"file type {meta.get('general.file_type')}"
        n_layers = int(meta.get("qwen2.block_count", "0") or 0)
        self._gpu_layers = n_layers if gpu_layers < 0 else min(gpu_layers, n_layers or gpu_layers)
        self._threads = threads
        self._path = path
        self._llm = llm

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def info(self) -> BackendInfo:
        m = self.manifest.model
        if self._gpu_layers:
            device = f"cuda ({self._gpu_layers} layers offloaded, {self._threads} CPU threads)"
        else:
            device = f"cpu ({self._threads} threads)"
        return BackendInfo(
            backend=self.name,
            model_id=m.id,
            model_path=str(self._path or m.path),
            device=device if self._llm is not None else "not loaded",
            dtype=self._quant,
            context_length=self.context_length,
            reason=getattr(self, "reason", ""),
            extra={"n_gpu_layers": self._gpu_layers, "n_threads": self._threads, "gguf": str(self._path or ""),
                   "parallel": self.capacity,
                   "batching": (f"continuous, {self.capacity} at once" if self.capacity > 1 else "off")},
        )

    @property
    def batch_stats(self) -> Any:
        """What the batch engine has done (steps, prompt tokens evaluated, shared and cached)."""
        return self._batcher.stats if self._batcher is not None else None

    def close(self) -> None:
        self.cancel_all()
        with self.exclusive():
            llm, self._llm = self._llm, None
            if llm is not None:
                self._close_engine(llm)

    def _close_engine(self, llm: Any) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()  # its context uses the model: freed first
        llm.close()

    # -- engine hooks ---------------------------------------------------------------------------
    def _require(self) -> Any:
        if self._llm is None:
            raise BackendError("The llama.cpp model is not loaded yet; call load() first.")
        return self._llm

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        llm = self._require()
        text = self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            **self._template_vars,
        )
        return llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)

    def encode_text(self, text: str) -> list[int]:
        return self._require().tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def decode(self, ids: Sequence[int]) -> str:
        # Invalid UTF-8 (a character split across tokens) becomes U+FFFD, which the driver's
        # incremental detokenizer treats as "wait for the next token".
        return self._require().detokenize(list(ids), special=True).decode("utf-8", "replace")

    def decode_loop(self, ids: list[int], params: SamplingParams, max_tokens: int,
                    on_token: Callable[[int], bool]) -> None:
        self._require()
        batcher = self._batcher
        if batcher is None:
            raise BackendError("The llama.cpp model is not loaded yet; call load() first.")
        # Reuse of a cached prefix (the second phase after a forced </think>, a follow-up turn,
        # the prompt of another sample) is the batcher's: it keeps each slot's KV.
        batcher.run(ids, params, max_tokens, on_token, self.cancel_check())


# -- registration ------------------------------------------------------------------------------

def llama_cpp_problem() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it can."""
    try:
        import_llama_cpp()
    except BackendError as exc:
        return str(exc)
    return None


def _check_model(manifest: Manifest) -> str:
    folder = inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    if folder.gguf is not None or folder.ggufs:
        return f"GGUF {require_gguf(folder)}"
    # An HF checkpoint is converted on the way, so the checkpoint itself must be sound.
    check_hf_folder(folder, allow_pickle_weights=manifest.model.allow_pickle_weights)
    return f"Hugging Face checkpoint {folder.path} (converted to GGUF {manifest.model.gguf_quant} on first start)"


def _auto_rank(ctx: AutoContext) -> AutoRank | None:
    folder = ctx.folder
    if folder is None:
        return None
    if folder.kind == "gguf" or ctx.manifest.model.gguf_file:
        return AutoRank(90, "the model folder holds a GGUF")
    if ctx.gpu and ctx.manifest.transformers.device != "cpu":
        return None  # a usable GPU and an HF checkpoint: transformers in float16 is the GPU path
    return AutoRank(50, "no CUDA GPU found")


def _plan(ctx: AutoContext) -> str:
    try:
        return plan_gguf(ctx.manifest, ctx.folder).why
    except NotEnoughDisk as exc:
        return f"cannot convert: {exc}"


ENGINE = EngineSpec(
    name="llamacpp",
    label="llama.cpp",
    summary="a GGUF through llama-cpp-python (CPU, or CUDA offload); converts an HF checkpoint once",
    create=lambda manifest: LlamaCppBackend(manifest),
    check_model=_check_model,
    extras=("llamacpp",),
    problem=llama_cpp_problem,
    auto_rank=_auto_rank,
    plan=_plan,
)
