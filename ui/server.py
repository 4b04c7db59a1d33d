"""Run the app: check the port, answer at once, load in the background, drain on SIGTERM."""
from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn

from backends import Manifest

from .app import build_app
from .host import ModelHost

log = logging.getLogger("ui.server")


class PortBusy(RuntimeError):
    pass


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a busy port fails in a second with a useful message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortBusy(
                f"Port {port} on {host} is already in use (another server, or an earlier run still going). "
                f"Stop that program, or choose another port with --port N or the environment variable VT_PORT."
            ) from None
        if exc.errno == errno.EACCES:
            raise PortBusy(
                f"Not allowed to listen on port {port}: ports below 1024 need root. "
                f"Choose another port with --port N or VT_PORT."
            ) from None
        raise PortBusy(f"Cannot listen on {host}:{port}: {exc.strerror}. Check --host / VT_HOST.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new generations (503), let running ones finish (at most
    ``drain_timeout_s``), then exit 0. A second SIGTERM or Ctrl+C quits at once."""

    def __init__(self, config: uvicorn.Config, host: ModelHost, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.host = host
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the
        # process would end with 143 instead of a clean 0.
        if self._drain_deadline is not None:
            # A second SIGTERM or SIGINT: whoever sent it does not want to wait.
            log.warning("second %s: quitting now", signal.Signals(sig).name)
            self.force_exit = True
            self.should_exit = True
            return
        log.info("received %s: draining (up to %.0f s for %d running generation(s))",
                 signal.Signals(sig).name, self.drain_timeout_s, self.host.busy)
        self._drain_deadline = time.monotonic() + self.drain_timeout_s
        # The port stays open while draining: /health says 503 "draining" and new generations get
        # 503 + Retry-After (a closed port would look like a crash to the platform's proxy); the
        # running ones go on streaming. uvicorn closes the port when the drain ends.
        self.host.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._drain_deadline is None:
            return False
        if self.host.busy == 0:
            log.info("no generation running: shutting down")
            return True
        if time.monotonic() >= self._drain_deadline:
            log.warning("drain timeout reached with %d generation(s) still running: shutting down",
                        self.host.busy)
            return True
        return False


class _QuietProbes(logging.Filter):
    """Platforms probe /health every few seconds and Prometheus scrapes /metrics: keep the
    successful ones out of the log so that requests and errors stay readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 5:
            path, status = str(args[2]), args[4]
            if path.split("?")[0].endswith(("/health", "/metrics")) and status == 200:
                return False
        return True


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    logging.getLogger("uvicorn.access").addFilter(_QuietProbes())


def security_warnings(manifest: Manifest) -> list[str]:
    auth = manifest.server.auth
    notes = []
    if manifest.server.host not in ("0.0.0.0", "::"):
        return notes
    if not (auth.username or auth.api_key):
        notes.append(
            f"Serving on {manifest.server.host}:{manifest.server.port} with no page login and no API key: "
            "anyone who can reach this port can use the model. Set server.auth.username/password "
            "(VT_USERNAME/VT_PASSWORD) and/or server.auth.api_key (VT_API_KEY), or bind --host 127.0.0.1."
        )
    elif not auth.api_key:
        notes.append(
            "server.auth.username/password protects the page; /v1 and /metrics then need the page's login "
            "session too, which API clients (the openai SDK, curl) do not have. Set server.auth.api_key "
            "(VT_API_KEY) to let them in with 'Authorization: Bearer <key>'."
        )
    elif not auth.username:
        notes.append(
            "server.auth.api_key protects /v1 and /metrics only: the page (and its own Gradio API) stays open. "
            "Set server.auth.username/password (VT_USERNAME/VT_PASSWORD) to protect it too."
        )
    return notes


def check_auth(manifest: Manifest) -> None:
    from backends import ManifestError

    auth = manifest.server.auth
    if bool(auth.username) != bool(auth.password):
        missing = "password" if auth.username else "username"
        raise ManifestError(
            f"server.auth.{missing} is empty while the other half of the page login is set: set both "
            "server.auth.username and server.auth.password (VT_USERNAME / VT_PASSWORD), or neither."
        )


def serve(manifest: Manifest) -> int:
    check_auth(manifest)
    server_cfg = manifest.server
    try:
        sock = bind_socket(server_cfg.host, server_cfg.port)
    except PortBusy as exc:
        log.error("%s", exc)
        return 1
    for note in security_warnings(manifest):
        log.warning("%s", note)
    host = ModelHost(manifest)
    app = build_app(host)
    host.start_loading()
    shown = "127.0.0.1" if server_cfg.host in ("0.0.0.0", "::") else server_cfg.host
    log.info("serving on http://%s:%d/ (page, /v1, /health, /metrics); the model loads in the background",
             shown, server_cfg.port)
    config = uvicorn.Config(
        app,
        log_config=None,  # keep our stdout logging
        timeout_graceful_shutdown=3,  # after draining only idle streams (page heartbeats) are left
        proxy_headers=True,
        forwarded_allow_ips="*",
    )
    server = DrainingServer(config, host, server_cfg.drain_timeout_s)
    try:
        server.run(sockets=[sock])
    finally:
        host.close()
        log.info("stopped")
    return 0
