"""Is Triton up? A gateway worker's watch on one Triton: probes, fast failure while it is down, recovery.

Every gateway worker watches the Triton it calls; only the process that started an embedded Triton
restarts it (:class:`services.triton.embedded.EmbeddedTriton`). While Triton answers, one liveness call
every ``probe_interval_s`` on a channel of the watch's own. ``probe_failures`` failed probes in a row (each
bounded by ``probe_timeout_s``, the next one at once) or one failed probe right after a call found Triton
UNAVAILABLE turn the watch *down*: the listeners hear it at once (gRPC health NOT_SERVING), and every call
is answered UNAVAILABLE without touching the network until Triton is back. Down, the watch probes each
``probe_interval_s`` until Triton is live and every model it needs is READY, runs the recovery hooks
(shared-memory regions registered again: a restarted Triton has forgotten them), and only then turns *up*.
One log line per change of state, never one per call. Calls in flight when the watch turns down (a hung
Triton never answers them) are abandoned through :meth:`TritonWatch.guard`, so they too end UNAVAILABLE
instead of at their deadline.

A dead Triton refuses connections, so it is noticed within milliseconds of the next probe; a hung one
(SIGSTOP, a wedged process) accepts them and never answers, so it is noticed after two probe timeouts:
with the defaults (0.5 s interval, 0.5 s timeout, two failures) within 1.5 s either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tritonclient.grpc.aio as triton_aio

log = logging.getLogger("medgate.triton.watch")

Listener = Callable[[bool], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]
T = TypeVar("T")


class TritonDown(ConnectionError):
    """The watch turned down while a call was waiting for Triton; the call was cancelled."""


def channel_args(*, keepalive_time_ms: int, reconnect_backoff_max_ms: int) -> list[tuple[str, Any]]:
    """gRPC channel arguments for every channel to Triton.

    gRPC's reconnect backoff grows to 120 s by default: a channel that saw Triton die would wait that long
    before it tried the restarted one. Capped, a channel is back within ``reconnect_backoff_max_ms`` of Triton.
    """
    return [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_backoff_max_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, reconnect_backoff_max_ms)),
        ("grpc.max_reconnect_backoff_ms", reconnect_backoff_max_ms),
    ]


class TritonWatch:
    """Up or down for one Triton URL; ``models``: the names that must be READY for it to count as up."""

    def __init__(
        self,
        url: str,
        models: list[str],
        *,
        probe_interval_s: float,
        probe_timeout_s: float,
        probe_failures: int,
        keepalive_time_ms: int,
        reconnect_backoff_max_ms: int,
    ) -> None:
        self.url = url
        self.models = list(models)
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.probe_failures = max(1, probe_failures)
        self._channel_args = channel_args(
            keepalive_time_ms=keepalive_time_ms, reconnect_backoff_max_ms=reconnect_backoff_max_ms
        )
        self._client: triton_aio.InferenceServerClient | None = None
        self._up = True
        self._reason = ""
        self._down_since = 0.0
        self._listeners: list[Listener] = []
        self._hooks: list[Hook] = []
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None  # resolved when the watch turns down
        self.changes = 0  # how often the state changed (tests, bench)

    @property
    def up(self) -> bool:
        return self._up

    @property
    def reason(self) -> str:
        """Why Triton counts as down ("" while up)."""
        return "" if self._up else self._reason

    def add_listener(self, listener: Listener) -> None:
        """``await listener(up)`` on every change of state (after it is made)."""
        self._listeners.append(listener)

    def add_recovery_hook(self, hook: Hook) -> None:
        """``await hook()`` before the watch turns up again; an exception keeps it down until the next probe."""
        self._hooks.append(hook)

    @property
    def client(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.url, channel_args=self._channel_args)
        return self._client

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"triton-watch {self.url}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def guard(self, call: Awaitable[T]) -> T:
        """Await ``call`` (a Triton call); cancel it and raise :class:`TritonDown` if the watch turns down first."""
        if self._lost is None or self._lost.done():
            self._lost = asyncio.get_running_loop().create_future()
            if not self._up:
                self._lost.set_result(None)
        lost = self._lost
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller gave up: so does the call (and Triton, through gRPC)
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TritonDown(self._reason)

    async def confirm(self, deadline: float) -> bool:
        """After a call found Triton UNAVAILABLE: one probe (bounded by ``deadline``) says whether to try again.

        False (and the watch down) when Triton does not answer; a dead one refuses at once, so the caller hears
        UNAVAILABLE within milliseconds instead of retrying until its deadline.
        """
        if not self._up:
            return False
        timeout = min(self.probe_timeout_s, deadline - time.monotonic())
        if timeout > 0 and await self._live(timeout):
            return True
        await self._set(False, "a call found it unavailable and it did not answer a probe")
        return False

    async def _live(self, timeout_s: float) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=timeout_s))
        except Exception:  # refused, timed out, closed: all mean "not now"
            return False

    async def _ready(self) -> bool:
        if not await self._live(self.probe_timeout_s):
            return False
        for name in self.models:
            try:
                if not await self.client.is_model_ready(name, client_timeout=self.probe_timeout_s):
                    return False
            except Exception:
                return False
        return True

    async def _run(self) -> None:
        failures = 0
        while True:
            if failures == 0:  # after a failed probe the next one goes at once
                await asyncio.sleep(self.probe_interval_s)
            try:
                if self._up:
                    if await self._live(self.probe_timeout_s):
                        failures = 0
                        continue
                    failures += 1
                    if failures >= self.probe_failures:
                        failures = 0
                        await self._set(False, f"{self.probe_failures} probes in a row got no answer")
                    continue
                if await self._ready():
                    for hook in self._hooks:
                        await hook()
                    await self._set(True, "")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a recovery hook failed: still down, try again next round
                failures = 0
                log.debug("Triton at %s: not back yet (%s)", self.url, type(exc).__name__)

    async def _set(self, up: bool, reason: str) -> None:
        if up == self._up:
            return
        self._up, self._reason = up, reason
        self.changes += 1
        if not up and self._lost is not None and not self._lost.done():
            self._lost.set_result(None)  # calls in flight are abandoned (guard)
        if up:
            down_s = time.monotonic() - self._down_since
            log.warning("Triton at %s is back after %.1f s; serving again", self.url, down_s)
        else:
            self._down_since = time.monotonic()
            log.error("Triton at %s is down (%s); answering UNAVAILABLE until it is back", self.url, reason)
        for listener in self._listeners:
            try:
                await listener(up)
            except Exception:
                log.exception("a listener of the Triton watch failed")
