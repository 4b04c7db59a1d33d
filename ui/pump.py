"""Run a blocking generator in a worker thread and consume it from asyncio.

The API must notice a dropped client while the backend is busy in a thread: the consumer calls
:meth:`Pump.stop`, the worker closes the generator at its next item (whose ``finally`` cancels the
backend), and nothing keeps decoding for a client that is gone.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Pump:
    def __init__(self, source: Iterator[Any], name: str = "pump") -> None:
        self._source = source
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = threading.Event()
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._stop.set()

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set():
                    break
                self._put(item)
        except BaseException as exc:  # handed to the consumer, who decides what it means
            self._put(_Raised(exc))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
            self.finished.set()
            self._put(_END)

    def stop(self) -> None:
        self._stop.set()

    async def get(self, timeout: float | None = None) -> Any:
        """The next item; raises the generator's exception; StopAsyncIteration at the end;
        TimeoutError when nothing came within ``timeout``."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _END:
            self._queue.put_nowait(_END)  # keep answering "ended" to later calls
            raise StopAsyncIteration
        if isinstance(item, _Raised):
            raise item.exc
        return item
