"""The engine registry: every engine the app can run, declared once by the engine's own module.

An engine is one module (``backends/engines/<name>.py``) that defines its Backend class and a
module-level ``ENGINE = EngineSpec(...)``. Everything that needs to know the engines derives from
this registry: the ``backend:`` values the manifest accepts, ``--backend`` choices and help,
``backend: auto`` (each engine ranks itself for the machine and model at hand), ``doctor``'s
report, the launcher's model check and install plan (the pip extras an engine needs).

Built-in engines are listed in :data:`BUILTIN`; more can be added without touching the app,
by naming their modules in the environment variable ``VT_ENGINE_MODULES`` (comma separated,
importable module names) or by calling :func:`register` in-process.
"""
from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .types import BackendError

if TYPE_CHECKING:
    from .base import Backend
    from .config.schema import Manifest
    from .models.checks import ModelFolder

BUILTIN = ("backends.engines.transformers", "backends.engines.llamacpp", "backends.engines.remote")
PLUGINS_ENV = "VT_ENGINE_MODULES"


@dataclass(frozen=True)
class AutoContext:
    """What ``backend: auto`` knows when it ranks the engines."""

    manifest: Manifest
    folder: ModelFolder | None  # None when the engine needs no local model (or it is unusable)
    gpu: bool  # a usable CUDA GPU (torch sees one, or the launcher's nvidia-smi does)


@dataclass(frozen=True)
class AutoRank:
    """An engine's bid for ``backend: auto``: the highest score runs, the rest are fallbacks."""

    score: int
    why: str  # "no CUDA GPU found", "the model folder holds a GGUF", …


@dataclass(frozen=True)
class EngineSpec:
    name: str
    summary: str  # one line for --help and doctor
    label: str  # how messages name it ("llama.cpp")
    # Builds (does not load) the engine; called only when this engine is chosen.
    create: Callable[[Manifest], Backend]
    # Whether model.path must name a local model folder.
    needs_local_model: bool = True
    # Checks the model folder for this engine (raises BackendError with the fix); returns a
    # short description for doctor. Cheap: headers only.
    check_model: Callable[[Manifest], str] | None = None
    # pyproject extras the engine needs (the launcher installs exactly these).
    extras: tuple[str, ...] = ()
    # Why the engine cannot run here at all (its library missing or broken), or None.
    problem: Callable[[], str | None] = lambda: None
    # Its bid for ``backend: auto``; None = never chosen automatically.
    auto_rank: Callable[[AutoContext], AutoRank | None] | None = None
    # What loading would do, without loading (doctor), for a usable model folder.
    plan: Callable[[AutoContext], str] | None = None


_lock = threading.Lock()
_engines: dict[str, EngineSpec] = {}
_loaded = False


def register(spec: EngineSpec) -> EngineSpec:
    """Add (or replace) an engine; returns it, so a module can write ``ENGINE = register(...)``."""
    if not spec.name.isidentifier() or spec.name == "auto":
        raise ValueError(f"engine name {spec.name!r} must be an identifier other than 'auto'")
    with _lock:
        _engines[spec.name] = spec
    return spec


def _import(module: str) -> None:
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(
            f"Engine module {module!r} cannot be imported ({exc}); fix {PLUGINS_ENV} or install what it needs."
        ) from None
    spec = getattr(loaded, "ENGINE", None)
    if not isinstance(spec, EngineSpec):
        raise BackendError(f"Engine module {module!r} defines no ENGINE = EngineSpec(...).")
    register(spec)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    plugins = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for module in (*BUILTIN, *plugins):
        _import(module)
    _loaded = True


def engines() -> dict[str, EngineSpec]:
    """name -> spec, built-ins first, in registration order."""
    _ensure_loaded()
    with _lock:
        return dict(_engines)


def names() -> list[str]:
    return list(engines())


def choices() -> list[str]:
    """Every accepted value of ``backend:``."""
    return ["auto", *names()]


def get(name: str) -> EngineSpec:
    found = engines().get(name)
    if found is None:
        raise BackendError(f"Unknown backend {name!r}: choose one of {', '.join(choices())}.")
    return found


def help_text() -> str:
    """One line per engine, for ``--help`` texts."""
    lines = ["auto: pick the best engine for this machine and model"]
    lines += [f"{spec.name}: {spec.summary}" for spec in engines().values()]
    return "; ".join(lines)


def ranked(ctx: AutoContext) -> list[tuple[EngineSpec, AutoRank]]:
    """The engines that bid for ``auto``, best first (usable or not: see ``EngineSpec.problem``)."""
    bids = []
    for spec in engines().values():
        if spec.auto_rank is None:
            continue
        bid = spec.auto_rank(ctx)
        if bid is not None:
            bids.append((spec, bid))
    return sorted(bids, key=lambda item: -item[1].score)
