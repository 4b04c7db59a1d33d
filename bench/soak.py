"""Soak: many requests back to back against one server, its resident memory sampled.

    python -m bench.soak --tiny                       # builds the tiny model, starts its own server
    python -m bench.soak --model DIR [--backend B]    # a real model, own server
    python -m bench.soak --url http://host:8080 --pid N   # a server already running (pid: to read its memory)

After ``--warmup`` requests the resident set (``/proc/<pid>/status`` VmRSS, the server process
alone) is the baseline; the soak passes when every later sample stays within ``--tolerance``
(5 %) of it. Not a CI test: it takes minutes and its figure depends on the machine. The server is
started as users start it (``python -m ui serve`` on 127.0.0.1) and never imported.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is 2+2?", "Think about the number forever.", "你好，1+1 等于几？", "What is 3+5?"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(backend: str, model: str, extra: list[str]) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="vt-soak-", suffix=".log")[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("VT_")}
    proc = subprocess.Popen([sys.executable, "-m", "ui", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--backend", backend, "--model", model, *extra], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"server not ready:\n{log.read_text()}")


def one_request(url: str, i: int, max_tokens: int, headers: dict[str, str]) -> bool:
    body = {"model": "vibethinker-1.5b", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
    if i % 2:  # half streaming, half not
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=600,
                          headers=headers) as r:
            lines = [line for line in r.iter_lines() if line]
        return r.status_code == 200 and lines[-1] == "data: [DONE]"
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600, headers=headers)
    return r.status_code == 200 and bool(r.json()["choices"][0]["finish_reason"])


def soak(url: str, pid: int, requests: int, warmup: int, max_tokens: int, tolerance: float,
         headers: dict[str, str]) -> dict:
    samples: list[tuple[int, int]] = []
    failures = 0
    started = time.monotonic()
    for i in range(requests):
        if not one_request(url, i, max_tokens, headers):
            failures += 1
        samples.append((i + 1, rss_bytes(pid)))
    after = [rss for n, rss in samples if n > warmup]
    base = after[0]
    drift = max(abs(rss - base) for rss in after) / base
    growth = (after[-1] - base) / base
    return {
        "requests": requests, "warmup": warmup, "failures": failures, "seconds": round(time.monotonic() - started, 1),
        "rss_start_mb": round(samples[0][1] / 2**20, 1), "rss_after_warmup_mb": round(base / 2**20, 1),
        "rss_end_mb": round(after[-1] / 2**20, 1), "rss_max_mb": round(max(after) / 2**20, 1),
        "max_drift_pct": round(100 * drift, 2), "end_growth_pct": round(100 * growth, 2),
        "flat": drift <= tolerance and failures == 0, "tolerance_pct": 100 * tolerance,
        "samples_mb": [round(rss / 2**20, 1) for _, rss in samples[:: max(1, requests // 20)]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (needs --pid)")
    p.add_argument("--pid", type=int, help="the running server's process id (its memory is sampled)")
    p.add_argument("--tiny", action="store_true", help="build the tiny test model and serve it")
    p.add_argument("--model", help="model to serve (own server)")
    p.add_argument("--backend", default="transformers")
    p.add_argument("--set", action="append", default=[], dest="sets", help="manifest KEY=VALUE for the own server")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--api-key", default=os.environ.get("VT_API_KEY", ""))
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    try:
        if args.url:
            if not args.pid:
                p.error("--url needs --pid (the server process whose memory is sampled)")
            url, pid = args.url.rstrip("/"), args.pid
        else:
            model = args.model
            if args.tiny:
                from bench.synthetic import make_tiny_model

                model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="vt-soak-model-")) / "tiny"))
            if not model:
                p.error("give --tiny, --model DIR, or --url with --pid")
            extra = [x for kv in args.sets for x in ("--set", kv)]
            proc, url, _ = start_server(args.backend, model, extra)
            pid = proc.pid
        result = soak(url, pid, args.requests, args.warmup, args.max_tokens, args.tolerance, headers)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(result, indent=2, ensure_ascii=False))
    verdict = "flat" if result["flat"] else "NOT flat"
    print(f"\nresident memory after {result['warmup']} warm-up requests: {result['rss_after_warmup_mb']} MB, "
          f"end {result['rss_end_mb']} MB, max drift {result['max_drift_pct']} % "
          f"({verdict} within {result['tolerance_pct']:g} %), {result['failures']} failed request(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if result["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
