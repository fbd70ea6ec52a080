"""The buffer between a connection's callbacks and the caller's ``async for``.

It outlives connections: the iterators handed to callers read from it and so
keep going across reconnects.  Two policies:

- unbounded (``maxlen=None``) for updates, whose number in flight is already
  bounded by the broker (AMQP prefetch, sized so that it times ``max_message_bytes``
  fits ``max_inflight_bytes``; MQTT in-flight window with manual acks). Holding
  deliveries back here would bound nothing: their bytes are already in memory;
- "latest wins" (``maxlen=n``) for models: when full, the oldest item is
  dropped, because a participant only ever needs the newest model.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, Self, TypeVar

__all__ = ["Inbox", "InboxIterator"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A FIFO that wakes every reader on close; ``get`` raises StopAsyncIteration then."""

    def __init__(self, maxlen: int | None = None) -> None:
        self._items: deque[T] = deque(maxlen=maxlen)
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Append (dropping the oldest item if bounded and full); ignored once closed."""
        if self._closed:
            return
        self._items.append(item)
        self._wakeup.set()

    def drop_where(self, stale: Callable[[T], bool]) -> int:
        """Forget the items ``stale`` picks (e.g. deliveries of a dead connection)."""
        keep = [item for item in self._items if not stale(item)]
        dropped = len(self._items) - len(keep)
        self._items.clear()
        self._items.extend(keep)
        return dropped

    def close(self) -> None:
        """Drop what is buffered and end every reader."""
        self._closed = True
        self._items.clear()
        self._wakeup.set()

    async def get(self) -> T:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()


class InboxIterator(Generic[T]):
    """``async for`` over an inbox, skipping items ``skip`` says are stale.

    A class rather than an async generator: nothing to finalize if the caller
    abandons the loop halfway.
    """

    def __init__(self, inbox: Inbox[T], skip: Callable[[T], bool] | None = None) -> None:
        self._inbox = inbox
        self._skip = skip

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        while True:
            item = await self._inbox.get()
            if self._skip is None or not self._skip(item):
                return item
