"""backends/fetch.py: model download, tested without the internet.

A tiny fake of the Hugging Face hub's HTTP interface on 127.0.0.1 (model info, file tree, resolve
with ETag/Range) lets the real huggingface_hub client download, lose its connection and resume.
"""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backends.models.fetch import INCOMPLETE_MARKER, FetchError, fetch_model, folder_is_complete

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "c0ffee" + "0" * 34


def _closed_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class FakeHub:
    """Serves one repository ``org/tiny``.

    ``cut_once``: the first full GET of that file sends half the body and drops the connection.
    ``missing_once``: the first GET of that file answers 404 (a run that fails midway).
    """

    def __init__(self, files: dict[str, bytes], cut_once: str | None = None, missing_once: str | None = None) -> None:
        self.files = files
        self.cut_once = cut_once
        self.missing_once = missing_once
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj: object, head: bool) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

            def _handle(self, head: bool) -> None:
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                hub.requests.append((self.command, path, rng))
                if "/resolve/" in path:
                    name = path.split("/resolve/", 1)[1].split("/", 1)[1]
                    data = hub.files.get(name)
                    if data is None or (name == hub.missing_once and not head):
                        if data is not None:
                            hub.missing_once = None
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    start = int(rng.split("=")[1].split("-")[0]) if rng and not head else 0
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                               "Accept-Ranges": "bytes", "Content-Length": str(len(data) - start)}
                    if head:
                        headers["Content-Length"] = str(len(data))
                        return self._send(200, b"", headers, head=True)
                    if start:
                        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    if name == hub.cut_once and not start:
                        hub.cut_once = None
                        self.send_response(200)
                        for k, v in headers.items():
                            self.send_header(k, v)
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    return self._send(206 if start else 200, data[start:], headers)
                if "/tree/" in path:
                    return self._json([{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                       for n, d in hub.files.items()], head)
                if path.startswith("/api/models/"):
                    repo = path[len("/api/models/"):].split("/revision/")[0]
                    if repo != "org/tiny":
                        return self._send(404, b'{"error":"Repository not found"}',
                                          {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, head)
                    return self._json({"id": repo, "sha": COMMIT,
                                       "siblings": [{"rfilename": n} for n in hub.files]}, head)
                return self._send(404, b"")

            def do_GET(self) -> None:
                self._handle(False)

            def do_HEAD(self) -> None:
                self._handle(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def weights() -> dict[str, bytes]:
    # Larger than two of huggingface_hub's 10 MB write chunks: a resume point needs a finished chunk.
    return {"config.json": b'{"model_type": "qwen2"}', "model.safetensors": bytes(range(256)) * (96 * 1024)}


@pytest.fixture
def serve_hub(weights: dict[str, bytes]) -> Iterator:
    hubs: list[FakeHub] = []

    def start(**kwargs: str) -> FakeHub:
        fake = FakeHub(weights, **kwargs)
        fake.thread.start()
        hubs.append(fake)
        return fake

    yield start
    for fake in hubs:
        fake.server.shutdown()
        fake.server.server_close()


def test_dropped_connection_is_resumed_with_a_range_request(serve_hub, weights: dict[str, bytes], tmp_path: Path) -> None:
    hub = serve_hub(cut_once="model.safetensors")
    dest = tmp_path / "model"
    messages: list[str] = []
    assert fetch_model(dest, "org/tiny", endpoint=hub.url, timeout=5, say=messages.append) == dest
    assert (dest / "model.safetensors").read_bytes() == weights["model.safetensors"]
    half = len(weights["model.safetensors"]) // 2
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("model.safetensors") and r]
    assert len(ranges) == 1, f"continued with a Range request: {hub.requests}"
    start = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= half, "continued from what had been written, not from zero"
    assert not (dest / INCOMPLETE_MARKER).exists() and folder_is_complete(dest)
    assert any("下载完成 / Download complete" in m for m in messages)


def test_failed_run_keeps_finished_files_and_next_run_continues(serve_hub, weights: dict[str, bytes], tmp_path: Path) -> None:
    hub = serve_hub(missing_once="model.safetensors")
    dest = tmp_path / "model"
    messages: list[str] = []
    with pytest.raises(FetchError) as err:
        fetch_model(dest, "org/tiny", endpoint=hub.url, timeout=5, say=messages.append)
    assert "HF_ENDPOINT" in str(err.value) and "rerun" in str(err.value)
    assert (dest / INCOMPLETE_MARKER).exists() and not folder_is_complete(dest), "never taken for a complete model"
    assert (dest / "config.json").read_bytes() == weights["config.json"]

    hub.requests.clear()
    fetch_model(dest, "org/tiny", endpoint=hub.url, timeout=5, say=messages.append)
    assert (dest / "model.safetensors").read_bytes() == weights["model.safetensors"]
    assert not [r for r in hub.requests if r[0] == "GET" and r[1].endswith("config.json")], "finished files are kept"
    assert not (dest / INCOMPLETE_MARKER).exists() and folder_is_complete(dest)
    assert any("继续下载 / Resuming" in m for m in messages)


def test_complete_folder_is_not_downloaded_again(weights: dict[str, bytes], tmp_path: Path) -> None:
    tiny_model_dir = tmp_path / "uploaded-by-hand"
    tiny_model_dir.mkdir()
    for name, data in weights.items():
        (tiny_model_dir / name).write_bytes(data)
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    messages: list[str] = []
    # The endpoint is closed: any network access would fail.
    assert fetch_model(tiny_model_dir, "org/tiny", endpoint=_closed_endpoint(), say=messages.append) == tiny_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before
    assert "no download needed" in messages[0]


def test_unreachable_endpoint_names_the_mirror_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = _closed_endpoint()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # honoured when no endpoint is passed
    with pytest.raises(FetchError) as err:
        fetch_model(tmp_path / "m", "WeiboAI/VibeThinker-1.5B", timeout=2, say=lambda _: None)
    text = str(err.value)
    assert "无法连接模型仓库 / Cannot reach the model hub" in text and endpoint in text
    assert "export HF_ENDPOINT=https://hf-mirror.com" in text and "modelscope" in text


def test_unknown_repository(serve_hub, tmp_path: Path) -> None:
    hub = serve_hub()
    with pytest.raises(FetchError, match="not found or not accessible"):
        fetch_model(tmp_path / "m", "org/nope", endpoint=hub.url, timeout=5, say=lambda _: None)


def test_bad_destinations_and_hub(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(FetchError, match="not a folder"):
        fetch_model(file, "org/tiny", endpoint=_closed_endpoint(), say=lambda _: None)
    with pytest.raises(FetchError, match="choose huggingface or modelscope"):
        fetch_model(tmp_path / "m", "org/tiny", hub="github", say=lambda _: None)


def test_modelscope_missing_is_explained(tmp_path: Path) -> None:
    try:
        import modelscope  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("modelscope is installed here: the missing-package message cannot be shown")
    with pytest.raises(FetchError, match=r"modelscope.*not installed.*pip install"):
        fetch_model(tmp_path / "m", "WeiboAI/VibeThinker-1.5B", hub="modelscope", say=lambda _: None)


def test_cli(serve_hub, weights: dict[str, bytes], tmp_path: Path) -> None:
    hub = serve_hub()
    dest = tmp_path / "cli-model"
    ok = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_model.py"), str(dest), "--repo-id", "org/tiny",
                         "--endpoint", hub.url], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert (dest / "model.safetensors").read_bytes() == weights["model.safetensors"]
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_model.py"), str(tmp_path / "x"),
                          "--endpoint", _closed_endpoint(), "--timeout", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "HF_ENDPOINT" in bad.stderr
