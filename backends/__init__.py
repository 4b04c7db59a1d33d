"""Inference backends behind one interface (see :mod:`backends.base`).

``create_backend(manifest)`` is the only constructor the rest of the app uses; heavy libraries
(torch, llama_cpp) are imported lazily by the chosen backend so that ``--help``, ``doctor`` and
the manifest checks start instantly.
"""
from __future__ import annotations

from . import registry
from .auto import create_backend, describe_choice
from .base import Backend
from .config import Manifest, ManifestError, load_manifest, to_sampling_params
from .types import (
    BackendError,
    BackendInfo,
    ChatMessage,
    ContextLengthExceeded,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    LoadProgress,
    RequestError,
    SamplingParams,
    StreamChunk,
    Usage,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendInfo",
    "ChatMessage",
    "ContextLengthExceeded",
    "EngineUnavailable",
    "FinishReason",
    "GenerationRequest",
    "LoadProgress",
    "Manifest",
    "ManifestError",
    "RequestError",
    "SamplingParams",
    "StreamChunk",
    "Usage",
    "create_backend",
    "describe_choice",
    "registry",
    "load_manifest",
    "to_sampling_params",
]

