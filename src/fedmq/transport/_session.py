"""Own reconnection: one supervisor task per transport keeps a session to the broker alive.

A ``Session`` is one broker connection with its channels / subscriptions.  It
is lost exactly once and never revived; the ``Supervisor`` then opens a new one
after a capped, jittered backoff (``_backoff.Backoff``), re-declaring the
topology and resubscribing explicitly (the broker module's ``serve``).  We do
not use aio-pika's robust connection or paho's own reconnect: their transparent
restore has known bugs, and an explicit loop makes every step visible.

Publishers call ``Supervisor.call``: it waits for a live session, runs the
operation, and on a broker error marks the session lost and retries on the
next one, so ``publish_*`` wait through outages.  Anything received on a lost
session (a delivery not yet acked) is stale: the broker redelivers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from fedmq.errors import BrokerUnavailable, ClosedResourceError, TransportError
from fedmq.transport._backoff import Backoff
from fedmq.transport._base import TransportConfig
from fedmq.transport._common import LOG, Lifecycle, redact_url

# How long a cancelled broker call, or a closing connection, may take to finish.
_REAP_S = 5.0

__all__ = ["Session", "SessionLost", "Supervisor"]

T = TypeVar("T")


class SessionLost(Exception):
    """Internal: the session died while an operation was waiting on it."""


class Session:
    """One broker connection. Lost once, never revived."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.error: BaseException | None = None
        self._lost = asyncio.Event()

    @property
    def is_lost(self) -> bool:
        return self._lost.is_set()

    def lose(self, error: BaseException | None = None) -> None:
        """Mark the session dead (idempotent); the supervisor then reconnects."""
        if not self._lost.is_set():
            self.error = error
            self._lost.set()

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def guard(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` but give up (SessionLost) as soon as the session is lost.

        Some client calls only notice a dead connection at their own timeout
        (aiomqtt waits for PUBACK without watching the socket); this does not wait.
        """
        if self.is_lost:
            coro.close()
            raise SessionLost
        op = asyncio.create_task(coro, name=f"fedmq.transport.{self.label}.op")
        lost = asyncio.create_task(self._lost.wait(), name=f"fedmq.transport.{self.label}.lost")
        try:
            await asyncio.wait((op, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not op.done():
                op.cancel()
            # Reap both so no "exception was never retrieved" / pending-task warnings escape,
            # but never wait forever on a client call that does not end when cancelled:
            # that would hang whoever cancelled us (a whole TaskGroup at shutdown).
            _, pending = await asyncio.wait((op, lost), timeout=_REAP_S)
            if pending:
                LOG.warning(
                    "%s: a broker call ignored its cancellation for %.0f s; abandoned",
                    self.label,
                    _REAP_S,
                )
        if op.cancelled():
            raise SessionLost
        return op.result()


S = TypeVar("S", bound=Session)


class Supervisor(Generic[S]):
    """Keeps one session alive, with backoff between attempts, until stopped.

    ``serve(up)`` connects, declares, subscribes, calls ``up(session)`` once the
    session is usable, and returns (or raises) when the session is lost.
    """

    def __init__(
        self,
        *,
        label: str,
        target: str,
        config: TransportConfig,
        serve: Callable[[Callable[[S], None]], Awaitable[None]],
        expected: tuple[type[BaseException], ...],
        is_fatal: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self._label = label
        self._target = target
        self._config = config
        self._serve = serve
        self._expected = expected
        self._is_fatal = is_fatal
        self._backoff = Backoff(initial_s=config.reconnect_initial_s, max_s=config.reconnect_max_s)
        self._current: S | None = None
        self._changed = asyncio.Event()
        self._stopped = False
        self._ever_up = False
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._down_since = time.monotonic()
        self.sessions = 0  # how many sessions came up (1 + reconnects), for tests and displays

    # -- state ---------------------------------------------------------------

    @property
    def current(self) -> S | None:
        """The live session, if any."""
        session = self._current
        return session if session is not None and not session.is_lost else None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def session(self) -> S:
        """Wait for a live session; ClosedResourceError once stopped."""
        while True:
            if self._stopped:
                raise ClosedResourceError(f"{self._label} is closed")
            session = self.current
            if session is not None:
                return session
            await self._changed.wait()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start the loop and wait for the first session.

        At most ``connect_timeout_s``, or for as long as it takes with ``wait_for_broker``.
        """
        self._task = asyncio.create_task(self._run(), name=f"fedmq.transport.{self._label}")
        limit = None if self._config.wait_for_broker else self._config.connect_timeout_s
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(self._first)
        except TimeoutError:
            raise BrokerUnavailable(
                f"{self._label}: no connection to {self._target} within "
                f"{self._config.connect_timeout_s} s (last error: {self._last_error!r})"
            ) from None

    async def stop(self) -> None:
        """Stop the loop and close the session (aiomqtt / aio-pika close on cancellation)."""
        self._stopped = True
        self._notify()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded, as in Session.guard: a client close that never returns is left behind.
            await asyncio.wait((task,), timeout=_REAP_S)
            if not task.done():
                LOG.warning("%s: the connection did not close within %.0f s", self._label, _REAP_S)
            elif not task.cancelled() and task.exception() is not None:
                LOG.error("%s: supervisor died", self._label, exc_info=task.exception())
        if not self._first.done():
            self._first.cancel()

    def _up(self, session: S) -> None:
        self._current = session
        self.sessions += 1
        if self._ever_up:
            LOG.warning(
                "%s: reconnected to %s after %d attempt(s), %.1f s without a connection",
                self._label,
                self._target,
                self._backoff.attempt,
                time.monotonic() - self._down_since,
            )
        else:
            LOG.info("%s: connected to %s", self._label, self._target)
        self._ever_up = True
        self._backoff.reset()
        if not self._first.done():
            self._first.set_result(None)
        self._notify()

    def _down(self, error: BaseException | None) -> None:
        session, self._current = self._current, None
        if session is not None:
            session.lose(error)
        self._notify()

    async def _run(self) -> None:
        while True:
            error: BaseException | None = None
            session: S | None = None
            try:
                await self._serve(self._up)
            except Exception as exc:
                error = exc
                if not isinstance(exc, self._expected):
                    LOG.error("%s: unexpected error in the connection", self._label, exc_info=exc)
            finally:
                session = self._current
                if error is None and session is not None:
                    error = session.error
                self._down(error)
            self._last_error = error
            if not self._ever_up and error is not None and self._is_fatal(error):
                self._first.set_exception(
                    TransportError(f"{self._label}: {self._target} refused us: {error!r}")
                )
                return
            delay = self._backoff.next_delay()
            if session is not None:  # an outage starts: say so once, loudly
                self._down_since = time.monotonic()
                LOG.warning(
                    "%s: connection lost (%r); reconnecting in %.2f s", self._label, error, delay
                )
            else:
                LOG.info(
                    "%s: %s attempt %d failed (%r); next in %.2f s",
                    self._label,
                    "reconnect" if self._ever_up else "connect",
                    self._backoff.attempt,
                    error,
                    delay,
                )
            await asyncio.sleep(delay)

    # -- operations ----------------------------------------------------------

    async def call(
        self,
        op: Callable[[S], Coroutine[Any, Any, T]],
        *,
        what: str,
        retryable: tuple[type[BaseException], ...],
    ) -> T:
        """Run ``op`` on a live session, retrying on the next session after broker errors.

        ``op`` raises anything that must not be retried (PayloadTooLarge) itself.
        """
        while True:
            session = await self.session()
            try:
                return await session.guard(op(session))
            except SessionLost:
                LOG.info("%s: connection lost during %s; retrying", self._label, what)
            except retryable as exc:
                LOG.info("%s: %s failed (%r); retrying after reconnect", self._label, what, exc)
                session.lose(exc)
            # The session is lost now; session() waits for the supervisor's next one.


class SupervisedTransport(Generic[S]):
    """The lifecycle the network transports share: entered once, one Supervisor, closed once.

    Subclasses call ``_init_lifecycle`` and provide ``_serve`` (one session), ``_close_inbox``
    (wake their iterators) and the broker's error classification.
    """

    _expected_errors: tuple[type[BaseException], ...] = ()

    def _init_lifecycle(self, config: TransportConfig, label: str) -> None:
        self._config = config
        self._label = label
        self._life = Lifecycle(label)
        self._supervisor: Supervisor[S] | None = None

    async def _serve(self, up: Callable[[S], None]) -> None:
        raise NotImplementedError

    def _close_inbox(self) -> None:
        raise NotImplementedError

    def _is_fatal(self, exc: BaseException) -> bool:
        return False

    async def __aenter__(self) -> Self:
        self._life.enter()
        self._supervisor = Supervisor(
            label=self._label,
            target=redact_url(self._config.url),
            config=self._config,
            serve=self._serve,
            expected=self._expected_errors,
            is_fatal=self._is_fatal,
        )
        try:
            await self._supervisor.start()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        self._life.close()
        self._close_inbox()
        if self._supervisor is not None:
            await self._supervisor.stop()

    @property
    def connected(self) -> bool:
        return self._supervisor is not None and self._supervisor.current is not None

    @property
    def sessions(self) -> int:
        """How many connections came up so far (1 + reconnects)."""
        return 0 if self._supervisor is None else self._supervisor.sessions
