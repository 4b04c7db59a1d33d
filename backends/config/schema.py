"""The one schema of ``manifest.yaml`` and the configuration precedence.

Precedence: command-line flag > environment variable > manifest.yaml > built-in default.
Every part of the app (backends, ui, bundle, 1键推理.sh via ``python -m ui config``) reads its
settings through :func:`load_manifest`, so a key is defined, validated and documented here once.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_MODEL_PATH = "/root/models/vibethinker-1.5b-app"
DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "manifest.yaml"


class _Section(BaseModel):
    # A typo in a key must stop start-up, not be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(_Section):
    """Where to fetch the model from when its folder is missing (only if ``download: true``)."""

    download: bool = False
    hub: Literal["huggingface", "modelscope"] = "huggingface"
    repo_id: str = "WeiboAI/VibeThinker-1.5B"
    revision: str = "main"


class ModelSettings(_Section):
    path: str = DEFAULT_MODEL_PATH
    # Name reported by /v1/models and accepted in the API's "model" field.
    id: str = "vibethinker-1.5b"
    # llama.cpp: GGUF file inside ``path`` (or an absolute path). Empty = the single *.gguf there,
    # or a conversion of the HF checkpoint when there is none.
    gguf_file: str = ""
    # Quantization used when the app converts an HF checkpoint to GGUF itself.
    gguf_quant: Literal["F32", "F16", "Q8_0", "Q4_K_M"] = "Q8_0"
    # Where converted GGUFs go when the model folder is read-only. Empty = ~/.cache/vibethinker-app.
    cache_dir: str = ""
    # Optional integrity check: file name (relative to path) -> SHA-256 hex digest.
    sha256: dict[str, str] = Field(default_factory=dict)
    # A pytorch_model.bin (pickle) checkpoint is refused unless this is true; even then it is
    # read with torch.load(weights_only=True).
    allow_pickle_weights: bool = False
    trust_remote_code: bool = False
    source: ModelSource = Field(default_factory=ModelSource)

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ValueError(f"sha256 of {name!r} must be 64 hex digits, got {digest!r}")
        return {k: v.lower() for k, v in value.items()}


class TransformersSettings(_Section):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # auto: float16 on CUDA (works on T4/V100), float32 on CPU (bfloat16 if the CPU has native support).
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # static + compile: CUDA-graph fast path (first request compiles for a minute).
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    # When device is cuda but none is usable: fall back to the CPU (true) or stop (false).
    cpu_fallback: bool = True
    # Many users: decode up to server.concurrency requests together with transformers' continuous
    # batching. auto = on when server.concurrency > 1; off = one request at a time (a FIFO queue).
    # Requests with a fixed seed still run one at a time (batching has no per-request seed).
    batching: Literal["auto", "on", "off"] = "auto"
    # KV cache shared by the batch, in tokens; 0 = server.concurrency x (max_new_tokens + 4096),
    # capped by the context window. Lower it when GPU memory is short.
    batch_cache_tokens: int = Field(default=0, ge=0)


class LlamaCppSettings(_Section):
    n_ctx: int = Field(default=32768, ge=512)
    n_batch: int = Field(default=512, ge=1)
    n_ubatch: int = Field(default=512, ge=1)
    # None = physical cores.
    n_threads: int | None = Field(default=None, ge=1)
    # "auto" = all layers when the build has CUDA and a GPU is present, else 0; or a number (-1 = all).
    n_gpu_layers: int | Literal["auto"] = "auto"
    flash_attn: Literal["auto", "on", "off"] = "auto"
    # Quantized KV cache halves its memory for very long reasoning (needs flash attention).
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    # Several sequences decoded together for many users (1 = a fair FIFO queue).
    parallel: int = Field(default=1, ge=1, le=64)


class LoopGuardSettings(_Section):
    enabled: bool = True
    # A span of up to max_period tokens repeated back-to-back min_repeats times, covering at least
    # min_tokens tokens, counts as a loop.
    max_period: int = Field(default=256, ge=1, le=4096)
    min_repeats: int = Field(default=4, ge=2)
    min_tokens: int = Field(default=64, ge=2)


class GenerationSettings(_Section):
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0 = off, as the model card recommends
    max_new_tokens: int = Field(default=40960, ge=1)
    seed: int | None = None
    # Max reasoning tokens; 0 = unlimited.
    thinking_budget: int = Field(default=0, ge=0)
    loop_guard: LoopGuardSettings = Field(default_factory=LoopGuardSettings)


class AuthSettings(_Section):
    username: str = ""
    password: str = ""
    # Bearer key required on /v1/* when set.
    api_key: str = ""


class ServerSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    # Sub-path when served behind a proxy (e.g. /proxy/8080). Empty = taken from X-Forwarded-Prefix.
    root_path: str = ""
    # Requests allowed to wait in line; more are refused with 429/queue-full.
    max_queue: int = Field(default=32, ge=1)
    # Requests generated at the same time (batching where the backend supports it).
    concurrency: int = Field(default=1, ge=1, le=64)
    # On SIGTERM, finish in-flight requests for at most this long (ModelArts allows 90 s).
    drain_timeout_s: float = Field(default=85.0, ge=0)
    language: Literal["auto", "zh", "en"] = "auto"
    auth: AuthSettings = Field(default_factory=AuthSettings)


class InstallSettings(_Section):
    # pip index (a mirror); empty = pip's own configuration / PIP_INDEX_URL.
    index_url: str = ""
    # reuse: keep a torch that the platform image already has; cpu/cuda: install that build.
    torch: Literal["reuse", "cpu", "cuda"] = "reuse"
    # Where 1键推理.sh keeps its virtual environment (relative to the app folder).
    venv: str = ".venv"


class Manifest(_Section):
    backend: Literal["auto", "transformers", "llamacpp"] = "auto"
    model: ModelSettings = Field(default_factory=ModelSettings)
    transformers: TransformersSettings = Field(default_factory=TransformersSettings)
    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    install: InstallSettings = Field(default_factory=InstallSettings)


class ManifestError(ValueError):
    """A bad manifest, environment variable or flag. The message is meant for the user as is."""


# Environment variables -> dotted manifest keys. Flags use the same dotted keys (see ``overrides``).
ENV_VARS: dict[str, str] = {
    "VT_BACKEND": "backend",
    "VT_MODEL": "model.path",
    "VT_MODEL_ID": "model.id",
    "VT_GGUF_QUANT": "model.gguf_quant",
    "VT_HOST": "server.host",
    "VT_PORT": "server.port",
    "VT_ROOT_PATH": "server.root_path",
    "VT_API_KEY": "server.auth.api_key",
    "VT_USERNAME": "server.auth.username",
    "VT_PASSWORD": "server.auth.password",
    "VT_DEVICE": "transformers.device",
    "VT_THINKING_BUDGET": "generation.thinking_budget",
    "VT_MAX_NEW_TOKENS": "generation.max_new_tokens",
}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ManifestError(f"{origin}: cannot set {dotted!r} because {key!r} is not a section")
        node = child
    node[leaf] = value


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Manifest
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe_error(err: dict[str, Any], origins: Mapping[str, str], default_origin: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    origin = origins.get(key, default_origin)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(err["loc"]))
        return f"  - {key}: unknown key (from {origin}); allowed here: {allowed}"
    allowed = err.get("ctx", {}).get("expected")
    msg = err["msg"]
    text = f"  - {key} = {err.get('input')!r} (from {origin}): {msg}"
    if allowed and allowed not in msg:
        text += f"; allowed: {allowed}"
    return text


def load_manifest(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Manifest:
    """Read manifest.yaml, apply environment variables then flag overrides, and validate.

    ``overrides`` maps dotted keys (``"server.port"``) to values from the command line; None
    values are ignored so that argparse defaults do not shadow the manifest.
    """
    manifest_path = Path(path) if path else DEFAULT_MANIFEST
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None or manifest_path.exists():
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(
                f"Manifest not found: {manifest_path}. Pass an existing file or omit it to use the defaults."
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ManifestError(f"{manifest_path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ManifestError(f"{manifest_path} must be a mapping of keys to values, got {type(loaded).__name__}")
        data = loaded
    for var, dotted in ENV_VARS.items():
        value = env.get(var)
        if value not in (None, ""):
            _set_dotted(data, dotted, value, f"environment variable {var}")
            origins[dotted] = f"environment variable {var}"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value, "command line")
            origins[dotted] = "command-line flag"
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(e, origins, str(manifest_path)) for e in exc.errors()]
        raise ManifestError(f"Invalid configuration in {manifest_path}:\n" + "\n".join(lines)) from None


def to_sampling_params(gen: GenerationSettings, **changes: Any):
    """Generation defaults from the manifest as backend SamplingParams (request fields override)."""
    from ..types import SamplingParams

    values = dict(
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens,
        seed=gen.seed,
        thinking_budget=gen.thinking_budget or None,
        loop_guard=gen.loop_guard.enabled,
    )
    values.update({k: v for k, v in changes.items() if v is not None})
    return SamplingParams(**values)
