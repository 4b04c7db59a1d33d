"""Timed generations for the benchmark, one engine configuration per process.

Three ways to run the same model on the same prompts:

- ``bare``: the library alone (``model.generate`` / ``llama_cpp.Llama.generate``), the baseline;
- ``backend``: our :class:`~backends.base.Backend` (``create_backend(manifest).stream``);
- ``http`` (in :mod:`bench.over_http`): our server's SSE stream, measured from a client.

Every run decodes exactly ``new_tokens`` tokens (the bench models cannot end a reply, see
:mod:`bench.models`) from a prompt of exactly ``prompt_tokens`` tokens. Each repetition
uses a different prompt of the same length so that no prefix cache can skip the prefill.

Definitions, the same on every path:
- TTFT: request start → first new token;
- prefill tok/s: prompt tokens ÷ TTFT (so it includes queueing and sampling the first token);
- decode tok/s: (new tokens − 1) ÷ (time of the last token − time of the first token).

A worker runs in its own process (``python -m bench.benchmark worker SPEC``) so that its peak
resident memory (VmHWM) belongs to that configuration alone.
"""
from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_MARK = "BENCH_RESULT "


@dataclass
class EngineSpec:
    """One engine configuration to measure."""

    name: str  # label in the report, e.g. "transformers-bf16" or "llamacpp-Q8_0"
    engine: str  # "transformers" | "llamacpp"
    hf_folder: str  # the HF checkpoint (tokenizer, chat template; the weights for transformers)
    gguf: str = ""  # llama.cpp model file
    device: str = "cpu"  # transformers: cpu | cuda
    dtype: str = "float32"  # transformers dtype
    cache: str = "dynamic"  # transformers: dynamic | static
    compile: bool = False  # transformers: torch.compile (with the static cache)
    n_gpu_layers: int = 0  # llama.cpp: -1 = all
    n_ctx: int = 4096  # llama.cpp context window (the same for bare and backend)
    n_threads: int | None = None
    flash_attn: str = "auto"
    weight_bytes: int = 0  # bytes a decoding step reads from the weights (roofline)
    kv_bytes_per_token: int = 0


@dataclass
class Sampling:
    temperature: float = 0.6  # the model card's settings: sampling costs are part of a token
    top_p: float = 0.95
    seed: int | None = 0  # None: each request random, as users send them (many users, samples)


@dataclass
class Run:
    """One timed generation."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tok_s: float
    total_s: float
    chunks: int = 0  # stream pieces received (backend/http), 0 for bare
    # http only: the backend's own decode rate as reported in the stream's last chunk.
    produced_tok_s: float | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0


@dataclass
class PathResult:
    """All runs of one engine configuration on one path."""

    engine: str
    path: str  # bare | backend | http
    runs: list[Run] = field(default_factory=list)
    warmup_s: float = 0.0
    load_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    skipped: str = ""  # why it was not measured
    info: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float:
        values = [getattr(r, name) for r in self.runs]
        values = [v for v in values if v is not None]
        return float(statistics.median(values)) if values else 0.0

    def summary(self) -> dict[str, Any]:
        if self.skipped or not self.runs:
            return {"engine": self.engine, "path": self.path, "skipped": self.skipped or "no runs"}
        return {
            "engine": self.engine,
            "path": self.path,
            "runs": len(self.runs),
            "prompt_tokens": self.runs[0].prompt_tokens,
            "new_tokens": int(statistics.median(r.new_tokens for r in self.runs)),
            "ttft_s": self.median("ttft_s"),
            "prefill_tok_s": float(statistics.median(r.prefill_tok_s for r in self.runs)),
            "decode_tok_s": self.median("decode_tok_s"),
            "decode_tok_s_all": [round(r.decode_tok_s, 3) for r in self.runs],
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "load_s": self.load_s,
            "warmup_s": self.warmup_s,
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PathResult:
        data = {k: v for k, v in data.items() if k != "summary"}
        runs = [Run(**r) for r in data.pop("runs", [])]
        return cls(runs=runs, **data)


def _rate(count: int, first: float | None, last: float | None) -> float:
    if first is None or last is None or count < 2 or last <= first:
        return 0.0
    return (count - 1) / (last - first)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident memory (VmHWM) of a process, 0 where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- prompts -----------------------------------------------------------------------------------
def make_prompts(hf_folder: str, prompt_tokens: int, count: int) -> list[dict[str, Any]]:
    """``count`` different chats whose templated prompt is exactly ``prompt_tokens`` tokens.

    The Qwen2 pre-tokenizer splits digits one by one, so each digit adds exactly one token: the
    prompts differ from their third token on (no shared prefix cache) and are padded with digits.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folder)
    # Short words: the test tokenizer splits text finely and prompts may be as short as 32 tokens.
    prompts = []
    for k in range(count):
        head = f"{k:03d}"
        digits = ""
        while True:
            messages = [
                {"role": "system", "content": head},
                {"role": "user", "content": f"Sum: {digits}"},
            ]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) >= prompt_tokens:
                break
            digits += str((len(digits) * 7 + k) % 10)
        if len(ids) != prompt_tokens:
            raise ValueError(
                f"cannot build a prompt of exactly {prompt_tokens} tokens (got {len(ids)}); use at least "
                f"{len(ids) - len(digits)} prompt tokens"
            )
        prompts.append({"messages": messages, "ids": ids})
    return prompts


# -- bare libraries ----------------------------------------------------------------------------
def _bare_hf(spec: EngineSpec, prompts: list[dict], new_tokens: int, sampling: Sampling, warmup: int,
             result: PathResult) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec.hf_folder, dtype=getattr(torch, spec.dtype),
                                                 attn_implementation="sdpa")
    model = model.to(spec.device).eval()
    result.load_s = time.perf_counter() - t0
    eos = model.generation_config.eos_token_id

    class Stamps(BaseStreamer):
        # generate() hands the prompt first, then each new token (already on the CPU).
        def __init__(self) -> None:
            self.times: list[float] = []
            self.calls = 0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def once(ids: list[int], count: int) -> Run:
        config = GenerationConfig(
            max_new_tokens=count, do_sample=sampling.temperature > 0, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=0, eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else eos[0],
            disable_compile=not spec.compile,
        )
        if spec.cache == "static":
            config.cache_implementation = "static"
        torch.manual_seed(sampling.seed)
        stamps = Stamps()
        input_ids = torch.tensor([ids], device=spec.device)
        start = time.perf_counter()
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                       streamer=stamps)
        end = time.perf_counter()
        times = stamps.times
        return Run(prompt_tokens=len(ids), new_tokens=len(times), ttft_s=(times[0] - start) if times else 0.0,
                   decode_tok_s=_rate(len(times), times[0] if times else None, times[-1] if times else None),
                   total_s=end - start)

    t0 = time.perf_counter()
    for i in range(warmup):
        # The warm-up decodes the full length: torch.compile specialises on shapes.
        once(prompts[-1 - i]["ids"], new_tokens if spec.compile else min(new_tokens, 8))
    result.warmup_s = time.perf_counter() - t0
    for p in prompts[: len(prompts) - warmup]:
        result.runs.append(once(p["ids"], new_tokens))
    if spec.device == "cuda":
        result.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())


def llama_kwargs(spec: EngineSpec) -> dict[str, Any]:
    """The Llama() settings our llama.cpp backend derives from the same manifest values."""
    from backends.engines.llamacpp import physical_cores

    threads = spec.n_threads or physical_cores()
    # As the backend: flash attention "auto" is on when layers are offloaded (f16 KV cache).
    flash = spec.flash_attn == "on" or (spec.flash_attn == "auto" and spec.n_gpu_layers != 0)
    return dict(n_ctx=spec.n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=spec.n_gpu_layers, flash_attn=flash, verbose=False)


def _bare_llama(spec: EngineSpec, prompts: list[dict], new_tokens: int, sampling: Sampling, warmup: int,
                result: PathResult) -> None:
    # The library as our engine imports it: on AMX CPUs plain llama_cpp crashes (llama.cpp #20824).
    from backends.engines.llamacpp import import_llama_cpp

    llama_cpp = import_llama_cpp()

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(spec.gguf, seed=sampling.seed, **llama_kwargs(spec))
    result.load_s = time.perf_counter() - t0

    def once(ids: list[int], count: int) -> Run:
        llm.reset()  # no prefix reuse between runs: every run pays its prefill
        times: list[float] = []
        start = time.perf_counter()
        # top_k 0 and min_p 0 = off, as the model card asks (and as our backend samples).
        for _ in llm.generate(ids, temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                              repeat_penalty=1.0):
            times.append(time.perf_counter())
            if len(times) >= count:
                break
        end = time.perf_counter()
        return Run(prompt_tokens=len(ids), new_tokens=len(times), ttft_s=times[0] - start,
                   decode_tok_s=_rate(len(times), times[0], times[-1]), total_s=end - start)

    t0 = time.perf_counter()
    for i in range(warmup):
        once(prompts[-1 - i]["ids"], min(new_tokens, 8))
    result.warmup_s = time.perf_counter() - t0
    for p in prompts[: len(prompts) - warmup]:
        result.runs.append(once(p["ids"], new_tokens))
    result.info["supports_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())


# -- our backend -------------------------------------------------------------------------------
def backend_manifest_data(spec: EngineSpec) -> dict[str, Any]:
    """The manifest (as a mapping) that makes our app run ``spec``; also used for the server."""
    data: dict[str, Any] = {
        "backend": spec.engine,
        "model": {"path": spec.hf_folder, "id": "bench"},
        # Random weights repeat themselves: the loop guard would (rightly) stop them early.
        "generation": {"loop_guard": {"enabled": False}, "temperature": 0.6, "top_p": 0.95},
    }
    if spec.engine == "transformers":
        data["transformers"] = {"device": spec.device, "dtype": spec.dtype, "attn_implementation": "sdpa",
                                "cache": spec.cache, "compile": spec.compile}
    else:
        data["model"]["gguf_file"] = spec.gguf
        llama: dict[str, Any] = {"n_ctx": spec.n_ctx, "n_batch": 512, "n_ubatch": 512,
                                 "n_gpu_layers": spec.n_gpu_layers, "flash_attn": spec.flash_attn}
        if spec.n_threads:
            llama["n_threads"] = spec.n_threads
        data["llamacpp"] = llama
    return data


def _via_backend(spec: EngineSpec, prompts: list[dict], new_tokens: int, sampling: Sampling, warmup: int,
                 result: PathResult) -> None:
    from backends import create_backend
    from backends.config import Manifest
    from backends.types import ChatMessage, GenerationRequest, SamplingParams

    manifest = Manifest.model_validate(backend_manifest_data(spec))
    backend = create_backend(manifest)
    t0 = time.perf_counter()
    backend.load()
    result.load_s = time.perf_counter() - t0
    result.info["backend"] = asdict(backend.info())

    def once(p: dict, count: int) -> Run:
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                max_new_tokens=count, seed=sampling.seed, thinking_budget=None, loop_guard=False)
        messages = tuple(ChatMessage(m["role"], m["content"]) for m in p["messages"])
        start = time.perf_counter()
        chunks = 0
        usage = None
        for chunk in backend.stream(GenerationRequest(messages=messages, params=params)):
            if chunk.reasoning or chunk.answer:
                chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
        end = time.perf_counter()
        if usage is None:
            raise RuntimeError("the backend stream ended without usage")
        return Run(prompt_tokens=usage.prompt_tokens, new_tokens=usage.completion_tokens,
                   ttft_s=usage.time_to_first_token_s or 0.0, decode_tok_s=usage.decode_tokens_per_s or 0.0,
                   total_s=end - start, chunks=chunks)

    t0 = time.perf_counter()
    for i in range(warmup):
        once(prompts[-1 - i], new_tokens if spec.compile else min(new_tokens, 8))
    result.warmup_s = time.perf_counter() - t0
    for p in prompts[: len(prompts) - warmup]:
        result.runs.append(once(p, new_tokens))
    if spec.device == "cuda" and spec.engine == "transformers":
        import torch

        result.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())
    backend.close()


def _samples(spec: EngineSpec, prompts: list[dict], new_tokens: int, sampling: Sampling, warmup: int,
             result: PathResult) -> None:
    """One request of 1 sample, then one of ``job["n"]`` samples, each on a fresh prompt: what the
    prompt costs (prompt tokens the engine evaluated, where it counts them) and when the samples
    get their first token."""
    from backends import create_backend
    from backends.config import Manifest
    from backends.types import ChatMessage, GenerationRequest, SamplingParams

    n_most = int(result.info.pop("n"))
    data = backend_manifest_data(spec)
    data["server"] = {"concurrency": n_most}
    backend = create_backend(Manifest.model_validate(data))
    backend.load()
    result.info["backend"] = asdict(backend.info())

    def once(p: dict, n: int, count: int) -> dict[str, Any]:
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                max_new_tokens=count, seed=sampling.seed, thinking_budget=None, loop_guard=False)
        messages = tuple(ChatMessage(m["role"], m["content"]) for m in p["messages"])
        stats = getattr(backend, "batch_stats", None)
        before = stats.prompt_tokens if stats is not None else None
        first: dict[int, float] = {}
        start = time.perf_counter()
        for chunk in backend.stream(GenerationRequest(messages=messages, params=params, n=n)):
            if (chunk.reasoning or chunk.answer) and chunk.index not in first:
                first[chunk.index] = time.perf_counter() - start
        total = time.perf_counter() - start
        return {"n": n, "prompt_tokens": len(p["ids"]), "new_tokens": count,
                "evaluated_prompt_tokens": (stats.prompt_tokens - before) if stats is not None else None,
                "first_token_s": min(first.values(), default=0.0), "all_first_tokens_s": max(first.values(), default=0.0),
                "total_s": total}

    once(prompts[-1], 1, 4)  # warm-up
    result.info["samples"] = [once(prompts[0], 1, new_tokens), once(prompts[1], n_most, new_tokens)]
    backend.close()


def run_worker(job: dict[str, Any]) -> PathResult:
    """Run one (engine, path) job: ``{"spec", "path", "prompts", "new_tokens", "sampling", "warmup"}``."""
    spec = EngineSpec(**job["spec"])
    sampling = Sampling(**job.get("sampling", {}))
    result = PathResult(engine=spec.name, path=job["path"])
    runner = {
        ("bare", "transformers"): _bare_hf,
        ("bare", "llamacpp"): _bare_llama,
        ("backend", "transformers"): _via_backend,
        ("backend", "llamacpp"): _via_backend,
        ("samples", "transformers"): _samples,
        ("samples", "llamacpp"): _samples,
    }[(job["path"], spec.engine)]
    if job["path"] == "samples":
        result.info["n"] = int(job.get("n", 8))
    runner(spec, job["prompts"], int(job["new_tokens"]), sampling, int(job.get("warmup", 1)), result)
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def worker_main(argv: list[str]) -> int:
    """Entry of ``python -m bench.benchmark worker JOB.json``: prints one result line."""
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run_worker(job)
    print(RESULT_MARK + json.dumps(result.to_json()), flush=True)
    return 0


# -- memory bandwidth (roofline) ----------------------------------------------------------------
def copy_bandwidth(total_bytes: int = 1 << 30, threads: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Best memory bandwidth of large numpy copies, counting bytes read plus bytes written.

    Several threads copy their own slices at once (numpy releases the GIL for plain copies), so
    that all cores load memory as llama.cpp's threads do.
    """
    import numpy as np

    threads = threads or max(1, len(os.sched_getaffinity(0)))
    src = np.ones(total_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if p.size]

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    best_multi = best_single = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best_single = max(best_single, 2 * src.nbytes / (time.perf_counter() - start))
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best_multi = max(best_multi, 2 * src.nbytes / (time.perf_counter() - start))
    return {"copy_gb_s_single_thread": best_single / 1e9, "copy_gb_s_all_threads": best_multi / 1e9,
            "threads": float(threads), "bytes": float(src.nbytes)}
