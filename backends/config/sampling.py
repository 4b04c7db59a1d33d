"""The manifest's generation defaults as a request's :class:`~backends.types.SamplingParams`."""
from __future__ import annotations

from typing import Any

from ..types import SamplingParams
from .schema import GenerationSettings


def to_sampling_params(gen: GenerationSettings, **changes: Any) -> SamplingParams:
    """Generation defaults from the manifest; request fields that are not None override them."""
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
