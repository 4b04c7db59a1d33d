"""The one schema of ``manifest.yaml``: every key, its type, default, allowed values and meaning.

Every part of the app (the engines, the server, the launcher behind 1键推理.sh) reads its settings
through this schema (:func:`backends.config.load_manifest`), so a key is defined, validated and
documented here once. The manifest is one file for the whole app, which is why the server and
installer sections live here too: they are data, and this package imports nothing of ``ui`` or
``bundle``. Each field's ``description`` is what ``python -m ui config`` and the docs show.

A field's ``env`` extra names its short environment variable (``VT_PORT``); every key can also be
set as ``VT_<SECTION>__<KEY>`` (``VT_SERVER__PORT``), see :mod:`backends.config.loading`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MODEL_PATH = "/root/models/vibethinker-1.5b-app"
DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "manifest.yaml"


def setting(default: Any = ..., description: str = "", *, env: str | None = None, **kwargs: Any) -> Any:
    """A field with its description and, optionally, its short environment variable."""
    extra = {"env": env} if env else None
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def section(model: type[BaseModel], description: str) -> Any:
    return Field(default_factory=model, description=description)


class _Section(BaseModel):
    # A typo in a key must stop start-up, not be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(_Section):
    download: bool = setting(False, "Download the model when its folder is missing or incomplete.")
    hub: Literal["huggingface", "modelscope"] = setting(
        "huggingface", "Where to download from; huggingface honours HF_ENDPOINT mirrors (e.g. hf-mirror.com).")
    repo_id: str = setting("WeiboAI/VibeThinker-1.5B", "Repository to download.")
    revision: str = setting("main", "Branch, tag or commit of the repository.")


class ModelSettings(_Section):
    path: str = setting(DEFAULT_MODEL_PATH, "Model folder (an HF safetensors checkpoint or a .gguf), or a .gguf file.",
                        env="VT_MODEL")
    id: str = setting("vibethinker-1.5b", "Name reported by /v1/models and accepted in the API's 'model' field.",
                      env="VT_MODEL_ID")
    gguf_file: str = setting(
        "", "llama.cpp: the GGUF inside model.path (or an absolute path); empty = the only *.gguf there, or a "
        "conversion of the HF checkpoint when there is none.")
    gguf_quant: Literal["F32", "F16", "Q8_0", "Q4_K_M"] = setting(
        "Q8_0", "Quantization of the app's own HF → GGUF conversion.", env="VT_GGUF_QUANT")
    cache_dir: str = setting("", "Where conversions go when the model folder is read-only; empty = "
                             "~/.cache/vibethinker-app/gguf.")
    sha256: dict[str, str] = setting(
        default_factory=dict, description="Optional integrity check: file name (relative to model.path) → SHA-256.")
    allow_pickle_weights: bool = setting(
        False, "Accept pytorch_model.bin (pickle) checkpoints, read with torch.load(weights_only=True).")
    trust_remote_code: bool = setting(False, "Let transformers run the checkpoint's own Python code.")
    source: ModelSource = section(ModelSource, "Where to fetch the model from when its folder is missing.")

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ValueError(f"sha256 of {name!r} must be 64 hex digits, got {digest!r}")
        return {k: v.lower() for k, v in value.items()}


class TransformersSettings(_Section):
    device: Literal["auto", "cuda", "cpu"] = setting("auto", "Where transformers runs: auto = CUDA when usable.",
                                                     env="VT_DEVICE")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = setting(
        "auto", "Weights' type: auto = float16 on CUDA (T4/V100 too), float32 on the CPU.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting("sdpa", "Attention kernel.")
    cache: Literal["dynamic", "static"] = setting(
        "dynamic", "KV cache: static + compile is the CUDA-graph fast path (the first request compiles for a minute).")
    compile: bool = setting(False, "torch.compile the decoding step (CUDA, with cache: static).")
    cpu_fallback: bool = setting(True, "When device is cuda but none is usable: fall back to the CPU (true) or stop.")
    batching: Literal["auto", "on", "off"] = setting(
        "auto", "Continuous batching of up to server.concurrency sequences: auto = on when server.concurrency > 1.")
    batch_cache_tokens: int = setting(
        0, "KV cache shared by the batch, in tokens; 0 = server.concurrency × (max_new_tokens + 4096), capped by the "
        "context window. Lower it when GPU memory is short.", ge=0)


class LlamaCppSettings(_Section):
    n_ctx: int = setting(32768, "Context window in tokens (with parallel > 1: for each sequence).", ge=512)
    n_batch: int = setting(512, "Prompt tokens evaluated per step.", ge=1)
    n_ubatch: int = setting(512, "Physical batch size of one evaluation.", ge=1)
    n_threads: int | None = setting(None, "CPU threads; null = the physical cores.", ge=1)
    n_gpu_layers: int | Literal["auto"] = setting(
        "auto", "Layers offloaded to the GPU: auto = all when the build has CUDA and a GPU is present, else 0; "
        "-1 = all.")
    flash_attn: Literal["auto", "on", "off"] = setting("auto", "Flash attention (needed by a quantized KV cache).")
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = setting(
        "f16", "KV cache type: q8_0 / q4_0 halve / quarter its memory for very long reasoning.")
    parallel: int | Literal["auto"] = setting(
        "auto", "Sequences decoded together (continuous batching): auto = server.concurrency; 1 = one at a time.")

    @field_validator("parallel")
    @classmethod
    def _parallel_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be between 1 and 64, or auto")
        return value


class RemoteSettings(_Section):
    base_url: str = setting(
        "", "backend: remote — the upstream's OpenAI-compatible root ending in /v1 (vLLM, SGLang, llama-server, "
        "another vibethinker-app), e.g. http://127.0.0.1:8000/v1.")
    api_key: str = setting("", "Bearer key the upstream expects; sent only to it, never shown, logged or served.")
    model: str = setting("", "Model name at the upstream; empty = the first id its /v1/models lists.")
    kind: Literal["auto", "vllm", "sglang", "llamacpp", "vibethinker", "openai"] = setting(
        "auto", "What serves the upstream (how the thinking budget and sampling extras are passed): auto = from its "
        "/v1/models; llamacpp = llama-server or llama-cpp-python's server; openai = standard fields only.")
    chat_template: str = setting(
        "", "The model's chat template, used to continue a reply whose thinking we closed (budget, loop): a .jinja "
        "file, a tokenizer_config.json or a model folder; empty = model.path's when it is a local folder, else "
        "the upstream's own (llama-server /apply-template).")
    connect_timeout_s: float = setting(3.0, "Seconds to connect to the upstream (each try).", gt=0)
    read_timeout_s: float = setting(
        600.0, "Longest silence while a reply streams (a long prompt on a busy upstream) before it counts as failed.",
        gt=0)
    connect_retries: int = setting(
        2, "Retries (after 0 s, 0.5 s, 1 s …) when connecting fails, before anything was sent.", ge=0, le=10)
    max_concurrency: int = setting(
        16, "Sequences sent to the upstream at once (users and samples together); more wait in our fair line.",
        ge=1, le=256)
    health_interval_s: float = setting(
        2.0, "How often the upstream is checked while it answers (every second while it does not).", gt=0, le=60)
    extra_body: dict[str, Any] = setting(
        default_factory=dict, description="Extra fields merged into every upstream request "
        "(e.g. {chat_template_kwargs: {...}}).")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip().rstrip("/")
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// address such as http://127.0.0.1:8000/v1")
        if parts.username or parts.password:
            raise ValueError("must not carry a user or password: put the upstream's key in remote.api_key")
        return value


class LoopGuardSettings(_Section):
    enabled: bool = setting(True, "Cut repetition loops (a span repeated back to back).")
    max_period: int = setting(256, "Longest repeated span looked for, in tokens.", ge=1, le=4096)
    min_repeats: int = setting(4, "Back-to-back repetitions that make a loop.", ge=2)
    min_tokens: int = setting(64, "Tokens a loop must cover at least.", ge=2)


class GenerationSettings(_Section):
    temperature: float = setting(0.6, "Sampling temperature (model card: 0.6, or 1.0); 0 = greedy.", ge=0.0, le=2.0)
    top_p: float = setting(0.95, "Nucleus sampling (model card: 0.95).", gt=0.0, le=1.0)
    top_k: int = setting(0, "Top-k sampling; 0 = off, as the model card recommends.", ge=0)
    max_new_tokens: int = setting(40960, "Most new tokens per reply (thinking + answer), capped by the context.",
                                  ge=1, env="VT_MAX_NEW_TOKENS")
    seed: int | None = setting(None, "Fixed sampling seed for reproducible replies; null = random.")
    thinking_budget: int = setting(
        0, "Most reasoning tokens; when reached the thinking is closed and the model still answers. 0 = unlimited.",
        ge=0, env="VT_THINKING_BUDGET")
    loop_guard: LoopGuardSettings = section(LoopGuardSettings, "Repetition-loop protection.")


class AuthSettings(_Section):
    username: str = setting("", "Page login user (set with password).", env="VT_USERNAME")
    password: str = setting("", "Page login password.", env="VT_PASSWORD")
    api_key: str = setting("", "Bearer key required on /v1/* when set.", env="VT_API_KEY")
    metrics: bool = setting(True, "Require the API key on /metrics too (when api_key is set).")


class ServerSettings(_Section):
    host: str = setting("0.0.0.0", "Address to listen on.", env="VT_HOST")
    port: int = setting(8080, "Port (the platform's 网页推理 proxy opens 8080).", ge=1, le=65535, env="VT_PORT")
    root_path: str = setting("", "Sub-path behind a proxy (e.g. /proxy/8080); empty = from X-Forwarded-Prefix.",
                             env="VT_ROOT_PATH")
    max_queue: int = setting(32, "Requests allowed to wait in line; more are refused (HTTP 429).", ge=1)
    concurrency: int = setting(1, "Sequences generated at the same time, for all users together.", ge=1, le=64)
    drain_timeout_s: float = setting(85.0, "On SIGTERM, finish in-flight requests for at most this long "
                                     "(ModelArts allows 90 s).", ge=0)
    language: Literal["auto", "zh", "en"] = setting("auto", "Page language: auto = the browser's.")
    auth: AuthSettings = section(AuthSettings, "Optional protection of the page and the API.")


class InstallSettings(_Section):
    index_url: str = setting("", "pip index (a mirror); empty = pip's own configuration / PIP_INDEX_URL.")
    torch: Literal["reuse", "cpu", "cuda"] = setting(
        "reuse", "reuse = keep the torch the platform image has; cpu / cuda = install that build.")
    venv: str = setting(".venv", "Where 1键推理.sh keeps its virtual environment (relative to the app folder).")


class SolveSettings(_Section):
    run_code: bool = setting(
        False, "Run the Python programs of answers against the problem's examples (page and API). Off by "
        "default: on a shared notebook its owner decides. Programs run isolated (see sandbox) and limited.",
        env="VT_RUN_CODE")
    sandbox: Literal["auto", "bubblewrap", "process"] = setting(
        "auto", "Isolation of those programs: auto = bubblewrap (namespaces: no network, read-only system) when "
        "bwrap works here, else process limits only; bubblewrap = refuse to run code without it.")
    cpu_time_s: float = setting(4.0, "CPU seconds per program run.", gt=0, le=600)
    wall_time_s: float = setting(15.0, "Wall-clock seconds per program run (it is killed then).", gt=0, le=3600)
    memory_mb: int = setting(512, "Address space of a program run, in MiB.", ge=64, le=65536)
    output_kb: int = setting(1024, "Most output (and any file) a program may write, in KiB.", ge=1, le=1048576)
    max_processes: int = setting(8, "Processes and threads a program may have.", ge=1, le=256)
    parallel_runs: int = setting(2, "Programs run at the same time (others wait).", ge=1, le=64)
    max_tests: int = setting(20, "Most examples and user tests run per answer.", ge=1, le=200)
    math_timeout_s: float = setting(
        5.0, "Longest math-verify may think about one answer (parse or comparison); then it is compared as text.",
        gt=0, le=120)


class Manifest(_Section):
    # Checked against the engine registry by load_config (the schema is data: it imports no engine).
    backend: str = setting("auto", "Inference engine: auto, or one of the registered engines (transformers, "
                           "llamacpp, …).", env="VT_BACKEND")
    model: ModelSettings = section(ModelSettings, "The model files.")
    transformers: TransformersSettings = section(TransformersSettings, "The transformers engine.")
    llamacpp: LlamaCppSettings = section(LlamaCppSettings, "The llama.cpp engine.")
    remote: RemoteSettings = section(RemoteSettings, "The remote engine: an OpenAI-compatible upstream "
                                     "(backend: remote).")
    generation: GenerationSettings = section(GenerationSettings, "Sampling defaults (requests may override them).")
    server: ServerSettings = section(ServerSettings, "The web page and API server.")
    install: InstallSettings = section(InstallSettings, "What 1键推理.sh installs.")
    solve: SolveSettings = section(SolveSettings, "Answers you can trust: voting over samples, running code "
                                   "against the problem's examples.")

    def llamacpp_parallel(self) -> int:
        """``llamacpp.parallel`` with ``auto`` resolved (it follows server.concurrency)."""
        value = self.llamacpp.parallel
        return self.server.concurrency if value == "auto" else int(value)


class ManifestError(ValueError):
    """A bad manifest, environment variable or flag. The message is meant for the user as is."""
