"""The math-verify worker process behind :class:`backends.answers.judge.MathJudge`.

One JSON request per line on stdin, one JSON reply per line on stdout:
``{"op": "parse", "text": ...}`` → ``{"parsed": bool, "shown": str}``;
``{"op": "verify", "gold": ..., "answer": ...}`` → ``{"equal": bool}``.

math-verify bounds its own work with SIGALRM, which only works on a main thread: the server
calls from worker threads, so here its timeouts are off (``parsing_timeout=None``,
``timeout_seconds=None``) and the parent bounds each request instead: it kills this process when a
reply is late and starts a new one. An address-space limit keeps a runaway simplification from
taking the machine's memory (it becomes a MemoryError, answered as an error).
"""
from __future__ import annotations

import json
import logging
import resource
import sys

MEMORY_BYTES = 3 * 1024**3
CACHE_MAX = 4096


def main() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    logging.disable(logging.WARNING)  # math-verify warns once that its timeouts are off: we know
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    cache: dict[str, list] = {}

    def parsed(text: str) -> list:
        if text not in cache:
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[text] = parse(f"${text}$", extraction_config=config, parsing_timeout=None)
        return cache[text]

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")  # imported: the parent's deadlines start now
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req["op"] == "parse":
                result = parsed(req["text"])
                objects = [x for x in result if not isinstance(x, str)]
                reply = {"parsed": bool(objects), "shown": str(objects[0]) if objects else ""}
            elif req["op"] == "verify":
                gold, answer = parsed(req["gold"]), parsed(req["answer"])
                equal = bool(gold and answer and verify(gold, answer, timeout_seconds=None))
                reply = {"equal": equal}
            else:
                reply = {"error": f"unknown op {req['op']!r}"}
        except MemoryError:
            cache.clear()
            reply = {"error": "out of memory"}
        except Exception as exc:  # noqa: BLE001 - any failure is an answer for the parent
            reply = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
