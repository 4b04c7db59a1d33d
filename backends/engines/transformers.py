"""The transformers engine: a Hugging Face checkpoint on CUDA (fp16/bf16) or the CPU (fp32/bf16).

Only loading and the engine hooks live here; requests, reasoning, budget and loop guard are the
shared driver's (:mod:`backends.driver`). torch and transformers are imported on load so that
``--help`` and ``doctor`` stay fast.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..base import ProgressCallback
from ..models.checks import check_hf_folder, inspect_model_folder, require_cuda, verify_sha256
from ..driver import EngineBackend
from ..config import Manifest
from .transformers_batching import POLL_S, BatchRunner, BatchSettings, cache_tokens_for
from ..registry import AutoContext, AutoRank, EngineSpec
from ..types import BackendError, BackendInfo, ChatMessage, EngineUnavailable, LoadProgress, SamplingParams

log = logging.getLogger(__name__)

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def batching_wanted(manifest: Manifest) -> bool:
    """transformers.batching: on, or auto with server.concurrency > 1 (eager attention excepted:
    batching would switch the shared model to paged attention under the one-at-a-time path)."""
    mode = manifest.transformers.batching
    if mode == "off":
        return False
    if mode == "auto":
        return manifest.server.concurrency > 1 and manifest.transformers.attn_implementation != "eager"
    return True


class TransformersBackend(EngineBackend):
    name = "transformers"

    def __init__(self, manifest: Manifest) -> None:
        self._batching = batching_wanted(manifest)
        # Batched: server.concurrency requests decode together; otherwise one at a time (FIFO).
        super().__init__(manifest, capacity=manifest.server.concurrency if self._batching else 1)
        self._batch: BatchRunner | None = None
        # Requests that cannot join the batch (fixed seed) decode alone, one at a time, beside it;
        # this lock also guards the one-at-a-time KV cache below.
        self._solo = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._dtype: Any = None
        self._device_note = ""
        # KV cache of the previous decode_loop and the ids it holds (for prefix reuse).
        self._cache: Any = None
        self._cache_ids: list[int] = []
        self.eos_token_ids = frozenset()
        self.context_length = 0

    # -- loading --------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _pick_device(self) -> str:
        import torch

        wanted = self.manifest.transformers.device
        if wanted == "cpu":
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        if wanted == "auto":
            return "cpu"
        if not self.manifest.transformers.cpu_fallback:
            require_cuda()  # raises with the reason and the fix
        log.warning(
            "transformers.device is cuda but CUDA is not available; running on the CPU instead "
            "(set transformers.cpu_fallback: false to stop instead). / 未检测到可用的 CUDA, 改用 CPU 运行。"
        )
        self._device_note = "CUDA requested but unavailable: fell back to the CPU"
        return "cpu"

    def _pick_dtype(self, device: str) -> Any:
        import torch

        choice = self.manifest.transformers.dtype
        if choice == "auto":
            return torch.float16 if device == "cuda" else torch.float32
        if choice == "float16" and device == "cpu":
            log.warning("float16 on the CPU is slow and lossy; consider dtype: float32 or bfloat16")
        return getattr(torch, choice)

    def load(self, progress: ProgressCallback | None = None) -> None:
        report: Callable[[float, str], None] = (
            (lambda f, m: progress(LoadProgress(f, m))) if progress else (lambda f, m: None)
        )
        with self.exclusive():
            if self._model is not None:
                report(1.0, "model already loaded / 模型已加载")
                return
            self._load(report)

    def _load(self, report: Callable[[float, str], None]) -> None:
        settings = self.manifest.model
        report(0.0, "checking the model folder / 检查模型文件夹")
        folder = inspect_model_folder(settings.path)
        check_hf_folder(folder, allow_pickle_weights=settings.allow_pickle_weights)
        if settings.sha256:
            report(0.05, "verifying SHA-256 checksums / 校验 SHA-256")
            verify_sha256(folder.path, settings.sha256)

        report(0.1, "importing torch and transformers / 加载 torch 与 transformers")
        problem = transformers_problem()
        if problem is not None:
            raise EngineUnavailable(f"The transformers backend cannot run: {problem}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        device = self._pick_device()
        dtype = self._pick_dtype(device)
        trust = settings.trust_remote_code
        report(0.2, "loading the tokenizer / 加载分词器")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder.path, trust_remote_code=trust)
        except Exception as exc:
            raise BackendError(
                f"Cannot load the tokenizer from {folder.path} ({type(exc).__name__}: {exc}); copy tokenizer.json "
                f"and tokenizer_config.json again from the original checkpoint."
            ) from exc
        if not getattr(tokenizer, "chat_template", None):
            raise BackendError(
                f"{folder.path}/tokenizer_config.json has no chat_template; copy it from the original VibeThinker "
                f"checkpoint (the app prompts the model with the model's own template)."
            )
        report(0.3, f"loading weights ({dtype}) / 加载权重")
        use_safetensors = bool(folder.safetensors)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder.path,
                dtype=dtype,
                attn_implementation=self.manifest.transformers.attn_implementation,
                trust_remote_code=trust,
                use_safetensors=use_safetensors,
                # transformers' own default too, stated so that a pickle is never run as code.
                weights_only=True,
            )
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if "flash_attn" in text or "flash_attention" in text:
                raise BackendError(
                    f"attn_implementation flash_attention_2 is not usable here ({exc}); set "
                    f"transformers.attn_implementation: sdpa in manifest.yaml."
                ) from exc
            if folder.pickle_weights and not use_safetensors:
                raise BackendError(
                    f"Cannot load the pickle weights in {folder.path} safely ({text}); torch.load(weights_only=True) "
                    f"refuses anything but plain tensors. Convert the checkpoint to *.safetensors."
                ) from exc
            raise BackendError(f"Cannot load the model from {folder.path}: {text}") from exc
        report(0.8, f"moving the model to {device} / 移动到 {device}")
        model = model.to(device)
        model.eval()

        eos: set[int] = set()
        for ids in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
            if ids is None:
                continue
            eos.update([ids] if isinstance(ids, int) else ids)
        vocab = tokenizer.get_vocab()
        eos.update(vocab[t] for t in _END_TOKENS if t in vocab)
        # The manifest, not the checkpoint's generation_config.json, decides sampling: start from a
        # clean config so that no hidden top_k / repetition_penalty of the checkpoint applies.
        model.generation_config = GenerationConfig(pad_token_id=min(eos) if eos else 0)

        self._model, self._tokenizer = model, tokenizer
        self._device, self._dtype = torch.device(device), dtype
        self.eos_token_ids = frozenset(eos)
        self.context_length = int(
            getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length or 4096
        )
        self._cache, self._cache_ids = None, []
        if self._batching:
            report(0.9, "starting continuous batching / 启动连续批处理")
            self._start_batching(model)
        report(1.0, "ready / 就绪")

    def _kv_tokens_that_fit(self, model: Any) -> int | None:
        """KV tokens that fit in a third of the memory transformers' batching counts as free on the
        model's device (its own check refuses a cache beyond that, and its activations, masks and
        the one-at-a-time path need the rest)."""
        try:
            from transformers.generation.continuous_batching.utils import get_device_and_memory_breakdown

            cfg = model.config
            heads = int(cfg.num_attention_heads)
            kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            per_token = int(cfg.num_hidden_layers) * 2 * kv_heads * head_dim * model.dtype.itemsize
            _, total, reserved, allocated = get_device_and_memory_breakdown()
            free = total - max(allocated, reserved)
        except Exception:  # noqa: BLE001 - unknown config or library layout: no cap, the manager checks
            return None
        return max(0, free // 3) // max(1, per_token)

    def _start_batching(self, model: Any) -> None:
        settings = self.manifest
        if settings.transformers.attn_implementation == "eager":
            raise BackendError(
                "transformers.batching: on needs attn_implementation sdpa or flash_attention_2 (eager would be "
                "switched to paged attention for every request); set one of them, or batching: off."
            )
        runner = BatchRunner(model, BatchSettings(
            capacity=self.capacity,
            cache_tokens=cache_tokens_for(self.capacity, settings.generation.max_new_tokens,
                                          self.context_length, settings.transformers.batch_cache_tokens,
                                          self._kv_tokens_that_fit(model)),
            vocab_size=int(model.config.vocab_size),
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            pad_token_id=int(model.generation_config.pad_token_id),
        ))
        try:
            runner.start()
            # The first batched step sets the manager up (seconds): pay it here, not in a user's TTFT.
            runner.warm_up(self.encode_chat([ChatMessage("user", "1+1")]))
        except Exception as exc:
            runner.close()
            self._model = self._tokenizer = None
            cache = runner.settings.cache_tokens
            raise BackendError(
                f"Continuous batching could not start ({type(exc).__name__}: {exc}). Its KV cache holds {cache} tokens "
                f"(server.concurrency {self.capacity} × room for a full reply of generation.max_new_tokens, or "
                f"transformers.batch_cache_tokens): set transformers.batch_cache_tokens lower (e.g. "
                f"{max(8192, cache // 8)}: the streams then share that many), lower server.concurrency, or set "
                "transformers.batching: off to serve one request at a time."
            ) from exc
        self._batch = runner

    def close(self) -> None:
        self.cancel_all()
        with self.exclusive():
            if self._model is None:
                return
            device = self._device
            if self._batch is not None:
                self._batch.close()
                self._batch = None
            self._model = self._tokenizer = self._cache = None
            self._cache_ids = []
            import gc

            gc.collect()
            if device is not None and device.type == "cuda":
                import torch

                torch.cuda.empty_cache()

    def info(self) -> BackendInfo:
        if self._model is None:
            raise BackendError("The model is not loaded yet: call load() first.")
        import torch

        if self._device.type == "cuda":
            index = self._device.index or 0
            device = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
        else:
            device = f"cpu ({torch.get_num_threads()} threads)"
        return BackendInfo(
            backend=self.name,
            model_id=self.manifest.model.id,
            model_path=str(Path(self.manifest.model.path).expanduser()),
            device=device,
            dtype=str(self._dtype).removeprefix("torch."),
            context_length=self.context_length,
            reason=self._device_note,
            extra={
                "attn_implementation": self.manifest.transformers.attn_implementation,
                "cache": self._cache_mode(),
                "torch": torch.__version__,
                # Seeded requests decode alone even when batching is on (no per-request seed in a batch).
                "batching": (f"continuous, {self.capacity} at once" if self._batch is not None else "off"),
            },
        )

    # -- engine hooks ---------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return self.encode_text(text)

    def encode_text(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _cache_mode(self) -> str:
        if self.manifest.transformers.cache == "static" and self._device is not None and self._device.type == "cuda":
            return "static"
        return "dynamic"

    def _reusable_cache(self, ids: list[int], max_tokens: int) -> Any:
        """The previous KV cache, trimmed to the prefix it shares with ``ids``, or None."""
        cache, cached = self._cache, self._cache_ids
        self._cache, self._cache_ids = None, []  # handed over (or dropped) either way
        if cache is None or not cached:
            return None
        common = _common_prefix(cached, ids)
        if common >= len(ids):
            common = len(ids) - 1  # the last prompt token must be evaluated to get logits
        if common <= 0:
            return None
        cached_len = int(cache.get_seq_length())
        if self._cache_mode() == "static":
            # A static cache has a fixed size; reuse it only when it already ends at our prefix
            # (the budget/loop phase boundary) and the new tokens still fit.
            capacity = int(cache.get_max_length())
            # The last sampled token never needs a slot, hence the - 1.
            if common < cached_len or (capacity > 0 and len(ids) + max_tokens - 1 > capacity):
                return None
        elif common < cached_len:
            if not cache.is_croppable:
                return None
            cache.crop(common - cached_len)  # transformers 5: a negative count of tokens to drop
        return cache

    def decode_loop(self, ids: list[int], params: SamplingParams, max_tokens: int,
                    on_token: Callable[[int], bool]) -> None:
        batch = self._batch
        if batch is not None and batch.supports(params):
            batch.run(ids, params, max_tokens, on_token, self.request_cancelled)
            return
        if self.capacity == 1:
            self._decode_alone(ids, params, max_tokens, on_token)  # the driver's lock already serialises
            return
        # Beside a running batch: wait for the other unbatchable requests, giving up on cancel,
        # then decode with the batch paused (it shares torch's global random generator).
        while not self._solo.acquire(timeout=POLL_S):
            if self.request_cancelled():
                return
        try:
            if batch is not None:
                with batch.paused():
                    self._decode_alone(ids, params, max_tokens, on_token)
            else:
                self._decode_alone(ids, params, max_tokens, on_token)
        finally:
            self._solo.release()

    def _decode_alone(self, ids: list[int], params: SamplingParams, max_tokens: int,
                      on_token: Callable[[int], bool]) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class _Callback(StoppingCriteria):
            # Called once per decoding step with the newest token: the driver decides to stop.
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                stop = on_token(int(input_ids[0, -1]))
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        if params.seed is not None:
            torch.manual_seed(params.seed)
        sample = params.temperature > 0
        cache = self._reusable_cache(ids, max_tokens)
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=sample,
            # Sampling flags only when sampling (greedy warns about them); top_k 0 = off, stated
            # because transformers' own default is 50.
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=params.top_k if sample else None,
            repetition_penalty=1.0,
            pad_token_id=self._model.generation_config.pad_token_id,
            return_dict_in_generate=True,
            disable_compile=not self.manifest.transformers.compile,
        )
        if cache is None and self._cache_mode() == "static":
            config.cache_implementation = "static"
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        kwargs: dict[str, Any] = {}
        if cache is not None:
            kwargs["cache"] = cache
        out = self._model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([_Callback()]),
            **kwargs,
        )
        cache = getattr(out, "cache", None)
        if cache is not None:
            length = int(cache.get_seq_length())
            self._cache, self._cache_ids = cache, out.sequences[0, :length].tolist()


# -- registration ------------------------------------------------------------------------------

def transformers_problem() -> str | None:
    """Why torch + transformers cannot be imported here, or None."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed: pip install -e '.[transformers]' (1键推理.sh installs it "
                f"for backend transformers/auto).")
    return None


def _check_model(manifest: Manifest) -> str:
    folder = inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    check_hf_folder(folder, allow_pickle_weights=manifest.model.allow_pickle_weights)
    return f"Hugging Face checkpoint {folder.path}"


def _auto_rank(ctx: AutoContext) -> AutoRank | None:
    folder = ctx.folder
    if folder is None or folder.kind != "hf" or ctx.manifest.model.gguf_file:
        return None
    if ctx.gpu and ctx.manifest.transformers.device != "cpu":
        return AutoRank(100, "CUDA GPU found")
    return AutoRank(10, "no CUDA GPU found")  # slower than llama.cpp on a CPU: its fallback


def _plan(ctx: AutoContext) -> str:
    manifest = ctx.manifest
    gpu = manifest.transformers.device != "cpu" and ctx.gpu
    dtype = manifest.transformers.dtype if manifest.transformers.dtype != "auto" else ("float16" if gpu else "float32")
    return f"{dtype} on {'CUDA' if gpu else 'the CPU'}"


ENGINE = EngineSpec(
    name="transformers",
    label="transformers",
    summary="a Hugging Face checkpoint through transformers (CUDA float16, or the CPU)",
    create=lambda manifest: TransformersBackend(manifest),
    check_model=_check_model,
    extras=("transformers",),
    problem=transformers_problem,
    auto_rank=_auto_rank,
    plan=_plan,
)
