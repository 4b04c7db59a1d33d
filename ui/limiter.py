"""One fair line for the model, shared by the web page and the /v1 API.

Gradio has its own queue for page events, but the API bypasses it, so both also take a ticket
here. The line counts sequences: ``concurrency`` is what the engine decodes at once (the host sets
it to the loaded engine's capacity, so the line admits exactly what runs), a request of n samples
takes a ticket of weight ``min(n, concurrency)``, at most ``max_queue`` requests wait, first come
first served (a heavy ticket at the head is not overtaken). Tickets are thread-based because
Gradio runs sync generators in worker threads and the API pumps the backend from a thread too.
"""
from __future__ import annotations

import collections
import threading


class QueueFull(RuntimeError):
    """Too many requests are already waiting (HTTP 429 / the page says so)."""


class LimiterClosed(RuntimeError):
    """The server is shutting down and admits no new generations."""


class Ticket:
    """A place in line. ``release()`` is safe to call in every state, any number of times."""

    def __init__(self, limiter: FairLimiter, weight: int) -> None:
        self._limiter = limiter
        self.weight = weight
        self._granted = threading.Event()
        self._released = False

    @property
    def granted(self) -> bool:
        return self._granted.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this ticket may run (True) or the timeout passes (False)."""
        if self._granted.wait(timeout):
            return True
        if self._limiter.closed_for(self):
            raise LimiterClosed("The server is shutting down; no new generations are started.")
        return False

    def position(self) -> int:
        """How many tickets are ahead of this one (0 = running or next)."""
        return self._limiter.position(self)

    def release(self) -> None:
        self._limiter._release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FairLimiter:
    def __init__(self, concurrency: int, max_queue: int) -> None:
        if concurrency < 1 or max_queue < 0:
            raise ValueError("concurrency must be >= 1 and max_queue >= 0")
        self.concurrency = concurrency
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: set[Ticket] = set()
        self._used = 0
        self._closed = False

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences running now (a request of n samples counts its weight)."""
        with self._lock:
            return self._used

    @property
    def running_requests(self) -> int:
        with self._lock:
            return len(self._running)

    def resize(self, concurrency: int) -> None:
        """Admit ``concurrency`` sequences at once from now on (the engine's capacity once loaded)."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        with self._lock:
            self.concurrency = concurrency
            self._admit()

    def enter(self, weight: int = 1) -> Ticket:
        """Take a ticket for ``weight`` sequences, granted at once when they fit and nobody waits.
        Raises QueueFull / LimiterClosed."""
        with self._lock:
            ticket = Ticket(self, max(1, min(weight, self.concurrency)))
            if self._closed:
                raise LimiterClosed("The server is shutting down; no new generations are started.")
            if self._used + ticket.weight <= self.concurrency and not self._waiting:
                self._grant(ticket)
                return ticket
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"The queue is full ({self.max_queue} requests waiting, {self.concurrency} running). "
                    "Try again shortly, or raise server.max_queue / server.concurrency in manifest.yaml."
                )
            self._waiting.append(ticket)
        return ticket

    def position(self, ticket: Ticket) -> int:
        with self._lock:
            try:
                return self._waiting.index(ticket)
            except ValueError:
                return 0

    def close(self) -> list[Ticket]:
        """Admit nobody new; waiting tickets are dropped (their wait() raises LimiterClosed)."""
        with self._lock:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
        return dropped

    def closed_for(self, ticket: Ticket) -> bool:
        with self._lock:
            return self._closed and ticket not in self._running

    def _grant(self, ticket: Ticket) -> None:
        ticket.weight = min(ticket.weight, self.concurrency)
        self._running.add(ticket)
        self._used += ticket.weight
        ticket._granted.set()

    def _admit(self) -> None:
        while self._waiting and self._used + min(self._waiting[0].weight, self.concurrency) <= self.concurrency:
            self._grant(self._waiting.popleft())

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            if ticket in self._running:
                self._running.discard(ticket)
                self._used -= ticket.weight
            else:
                try:
                    self._waiting.remove(ticket)
                except ValueError:
                    pass
            self._admit()
