"""`Client`: the blocking front, an `AsyncClient` driven by a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from zmesh import protocol as P
from zmesh.client.async_client import AsyncClient


class Client:
    """Blocking client: an `AsyncClient` driven by a private event-loop thread."""

    def __init__(self, endpoints: str | Sequence[str], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="zmesh-client"
        )
        self._thread.start()
        self._async = self._call(self._make(endpoints, kwargs))

    @staticmethod
    async def _make(endpoints: str | Sequence[str], kwargs: dict[str, Any]) -> AsyncClient:
        return AsyncClient(endpoints, **kwargs)

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> P.Done:
        return self._call(self._async.generate(prompt, **kwargs))

    def status(self, endpoint: str | None = None, timeout: float = 5.0) -> P.Status:
        return self._call(self._async.status(endpoint, timeout))

    @property
    def counters(self) -> Counter[str]:
        return self._async.counters

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[P.Chunk | P.Done]:
        agen = self._async.stream(prompt, **kwargs)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():  # a stream dropped early: cancel it on the node
                self._call(agen.aclose())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
