"""Typed request and response objects of the OpenAI-compatible ``/v1`` API (they make its
OpenAPI schema at ``/v1/openapi.json``).

Reasoning travels as ``reasoning_content`` (DeepSeek/vLLM until late 2025) and as ``reasoning``
(vLLM since, OpenRouter) because clients differ. Our extras are optional request fields
(``thinking_budget``, ``top_k``) and a ``vibethinker`` object in responses. Unknown request
fields that OpenAI defines (``frequency_penalty``, ``user``, …) are accepted and ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.types import MAX_SAMPLES


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- request ----------------------------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(description="Only 'text' parts are supported.")
    text: str | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(
        default=None, description="Text, or a list of {'type': 'text', 'text': …} parts.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(default=False, description="Send a last chunk with the usage of the whole request.")


class TestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(max_length=1_000_000, description="Standard input of the program.")
    output: str = Field(max_length=1_000_000, description="Expected standard output.")
    name: str | None = Field(default=None, max_length=200)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="The model id from GET /v1/models.")
    messages: list[MessageIn] = Field(min_length=1, max_length=4096)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0,
                                      description="Default: generation.temperature (model card: 0.6).")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, description="Extra: top-k sampling, 0 = off.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most new tokens, thinking included.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens (newer name).")
    seed: int | None = Field(default=None, description="Sample i of n uses seed + i.")
    thinking_budget: int | None = Field(
        default=None, ge=0, description="Extra: most reasoning tokens; the thinking is then closed and the model "
        "still answers. 0 = unlimited.")
    n: int | None = Field(default=None, ge=1, le=MAX_SAMPLES,
                          description=f"Samples of the same prompt (1–{MAX_SAMPLES}); the prompt is evaluated once.")
    check_code: bool | None = Field(
        default=None, description="Extra: run each answer's final Python program against the examples stated in "
        "the last user message (and `tests`) in the server's sandbox; the verdicts come in each choice's "
        "vibethinker.code_check, and with n > 1 the consensus counts passing programs. Needs solve.run_code: true "
        "on the server (otherwise 400).")
    tests: list[TestIn] | None = Field(default=None, max_length=200,
                                       description="Extra: more tests for check_code (stdin → expected stdout).")
    stop: str | list[str] | None = Field(default=None, description="Not supported: must be absent.")
    tools: list[Any] | None = Field(default=None, description="Not supported: must be absent.")


# -- responses --------------------------------------------------------------------------------------

class TestVerdict(_Out):
    name: str
    verdict: str = Field(description="passed | wrong_answer | runtime_error | time_limit | memory_limit | "
                         "output_limit | blocked | compile_error | sandbox_error | skipped")
    passed: bool
    message: str
    time_s: float = Field(description="Wall-clock time of the run, Python's start included.")
    cpu_s: float
    input: str
    expected: str
    got: str
    diff: str
    stderr: str
    source: str = Field(description="problem (an example stated in it) | user (from tests)")


class IsolationOut(_Out):
    kind: Literal["bubblewrap", "process"]
    network_isolated: bool
    filesystem_isolated: bool
    own_user: bool
    limits: dict[str, Any]
    note: str
    summary: str


class CodeCheck(_Out):
    verdict: Literal["passed", "failed", "no_program", "no_tests"]
    program_found: bool
    passed: int
    total: int
    results: list[TestVerdict]
    isolation: IsolationOut | None = Field(default=None, description="What protected the server from the program.")
    note: str = ""


class ConsensusGroup(_Out):
    answer: str
    votes: int
    indexes: list[int] = Field(description="The choices (samples) in this group.")
    method: str = Field(description="text | math-verify (how members were matched) | for code: text")


class ConsensusOut(_Out):
    """The vote over the n samples (self-consistency, cons@n)."""

    kind: Literal["math", "code"]
    answer: str | None = Field(description="The majority's final boxed answer (code: 'passes all N examples').")
    votes: int
    samples: int
    groups: list[ConsensusGroup]
    no_answer: list[int] = Field(description="Finished without a boxed answer (code: without a program).")
    cut_off: list[int] = Field(description="Stopped at the length limit.")
    failed: list[int] = Field(description="Cancelled or failed.")
    pending: list[int]
    tie: bool
    best_index: int | None = Field(description="A choice of the winning group (code: a passing program).")
    equivalence: str = Field(description="math-verify | text (math-verify unavailable) | tests (code)")
    examples: int | None = Field(default=None, description="Code: the examples each program ran on.")
    notes: list[str] = Field(description="Fallbacks and ties, e.g. an answer compared as text.")


def _absent(value: Any) -> bool:
    return value is None


class Extras(_Out):
    """Our extras for one choice: why it ended, and the final boxed answer."""

    finish_reason: str = Field(description="stop | length | budget | loop | cancelled | error")
    detail: str = ""
    boxed_answer: str | None = None
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    reasoning_tokens: int | None = Field(default=None, exclude_if=_absent, description="This choice's thinking.")
    answer_tokens: int | None = Field(default=None, exclude_if=_absent, description="This choice's answer.")
    code_check: CodeCheck | None = Field(default=None, exclude_if=_absent,
                                         description="With check_code: the program's verdict on each example.")


class CompletionTokensDetails(_Out):
    reasoning_tokens: int


class UsageOut(_Out):
    prompt_tokens: int = Field(description="Counted once, however many samples share the prompt.")
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


class MessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str
    reasoning: str


class Choice(_Out):
    index: int
    message: MessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    vibethinker: Extras


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut
    vibethinker: Extras = Field(description="choices[0].vibethinker (for clients that read one choice).")
    consensus: ConsensusOut | None = Field(default=None, exclude_if=_absent,
                                           description="With n > 1: the vote over the choices.")


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChunkChoice(_Out):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    vibethinker: Extras | None = Field(default=None, description="On each choice's last chunk.")
    consensus: ConsensusOut | None = Field(
        default=None, description="With n > 1: the vote, in a last chunk with no choices (before [DONE]).")


class ModelMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str = Field(description="loading | ready | failed | draining")


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "WeiboAI"
    metadata: ModelMetadata


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorBody


class Health(BaseModel):
    health: Literal["true", "false"]
    status: str | None = None
    reason: str | None = None
    progress: float | None = None
