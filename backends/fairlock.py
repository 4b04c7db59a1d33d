"""The engine's fair line: a FIFO lock (or counting semaphore) whose waiters can give up."""
from __future__ import annotations

import threading
from collections import deque


class FairLock:
    """A FIFO lock whose waiters can give up (cancellation) while in line.

    ``capacity`` > 1 makes it a fair counting semaphore for engines that decode several requests
    together (continuous batching): each request takes one slot, :meth:`EngineBackend.exclusive`
    takes them all. FIFO order holds for every weight, so a waiting exclusive user is never
    overtaken by later requests. With the default capacity of 1 it is the plain FIFO lock.
    """

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._used = 0

    def acquire(self, cancelled: threading.Event | None = None, weight: int = 1) -> bool:
        """Wait for our turn; False (and out of the line) if ``cancelled`` is set first."""
        weight = max(1, min(weight, self.capacity))
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            try:
                while self._used + weight > self.capacity or self._line[0] is not ticket:
                    if cancelled is not None and cancelled.is_set():
                        return False
                    self._cond.wait()
                if cancelled is not None and cancelled.is_set():
                    return False
                self._used += weight
                return True
            finally:
                self._line.remove(ticket)
                # Whoever is now first in line must re-check (we left it or took the lock).
                self._cond.notify_all()

    def release(self, weight: int = 1) -> None:
        with self._cond:
            self._used = max(0, self._used - max(1, min(weight, self.capacity)))
            self._cond.notify_all()

    def wake(self) -> None:
        """Make waiters re-check their cancellation flag."""
        with self._cond:
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._line)

    @property
    def held(self) -> bool:
        with self._cond:
            return self._used > 0

    @property
    def running(self) -> int:
        """Slots in use (requests decoding now, or ``capacity`` during an exclusive section)."""
        with self._cond:
            return self._used
