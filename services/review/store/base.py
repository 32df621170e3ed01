"""What every review store backend shares: the semantics, waiting for work, and starting a loop on activation."""

from __future__ import annotations

import abc
import builtins
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from services.review.flows import FlowDefinition, ResultSummary
from services.review.store.keys import auto_loop_name
from services.review.store.model import ACTIVATION_REASONS_KEY, AlreadyExists, Loop

logger = logging.getLogger("medgate.review.store")


class ReviewStoreBase(abc.ABC):
    """Human loops, deliveries and decisions; thread-safe. A backend supplies storage, this class the rest.

    Semantics, where A2I leaves us free:

    * **Loops.** The loop name is the idempotency key. ``start_loop`` with a known name and the same
      input (flow, input content, input hash and image bytes) returns the existing loop, whatever its
      status; a different input raises :class:`AlreadyExists`. Flow limits (task count, lifetime, time
      limit) are copied into the loop when it starts, so editing a flow file never changes running loops.
    * **Statuses.** ``InProgress`` until ``task_count`` decisions (``Completed``), ``stop`` (``Stopped``,
      at once: there is no asynchronous worker, so ``Stopping`` is never stored), or expiry after
      ``task_availability_lifetime_s`` (``Failed``, ``FailureCode="Expired"``). Decisions already made
      on a stopped or failed loop are kept. ``delete`` is allowed for Completed, Failed and Stopped loops
      only (as A2I) and removes the loop's images, deliveries and decisions.
    * **Delivery.** A lease lasts the loop's ``task_time_limit_s``. A reviewer never holds two leases
      on one loop and never gets a loop it answered or released (release means "not for me"); a lease
      that expired may come back to the same reviewer (at-least-once). Expired leases return to the
      queue on every write and on :meth:`ReviewStore.expire`; leases still open when a store is opened
      were lost with the previous process and go back to the queue at once.
    * **Decisions.** Idempotent by decision id: the same id with the same (loop, reviewer, answer)
      returns the recorded decision (``replayed=True``), even after the loop completed; the same id with
      anything else raises :class:`AlreadyExists`. The delivery id is not part of the payload, so a client
      that re-received a case after a restart may resend its decision under the new delivery. A late
      decision (lease expired or released) is accepted while the loop is open and the reviewer has not
      answered it, rather than throwing a radiologist's work away; when the last needed answer arrives,
      other open leases on the loop are cancelled. ``submit`` returns only after the transaction is
      committed with ``synchronous=FULL``: an acknowledged decision is on disk.
    * **Images** (e.g. PNG bytes of the letterboxed image) live in a BLOB table in the same database, so a
      loop and its images are created, backed up and deleted atomically.
    * **Waiting.** :attr:`ReviewStore.work_version` grows whenever deliverable work may have appeared
      (a loop started, a lease released or expired). Block on :meth:`ReviewStore.wait_for_work` from a
      thread, or bridge to asyncio with ``store.subscribe(lambda v: loop.call_soon_threadsafe(event.set))``;
      :meth:`ReviewStore.next_deadline` says when to call :meth:`ReviewStore.expire` next.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._work_version = 0
        self._listeners: builtins.list[Callable[[int], object]] = []

    @abc.abstractmethod
    def start_loop(
        self,
        flow: FlowDefinition,
        name: str,
        input_content: Mapping[str, Any],
        input_hash: str,
        *,
        images: Mapping[str, bytes] | None = None,
    ) -> Loop:
        """Start a loop, or return the one already started under this name with the same input."""

    @abc.abstractmethod
    def describe(self, name: str) -> Loop: ...

    # -- waiting for work ---------------------------------------------------------------------

    @property
    def work_version(self) -> int:
        with self._changed:
            return self._work_version

    def wait_for_work(self, since: int, timeout_s: float | None = None) -> int:
        """Block until :attr:`work_version` exceeds ``since`` (or the timeout); return the version."""
        with self._changed:
            self._changed.wait_for(lambda: self._work_version > since, timeout_s)
            return self._work_version

    def subscribe(self, callback: Callable[[int], object]) -> Callable[[], None]:
        """Call ``callback(version)`` after each commit that may have added work; returns unsubscribe.

        The callback runs on the committing thread and must be quick and never raise (an asyncio
        server passes ``loop.call_soon_threadsafe``-based callbacks).
        """
        with self._changed:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._changed:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def _notify_work(self) -> None:
        with self._changed:
            self._work_version += 1
            version = self._work_version
            listeners = builtins.list(self._listeners)
            self._changed.notify_all()
        for callback in listeners:
            try:
                callback(version)
            except Exception:
                logger.exception("review store listener failed")

    # -- loops ----------------------------------------------------------------------------------

    def start_if_activated(
        self,
        flow: FlowDefinition,
        summary: ResultSummary,
        input_content: Mapping[str, Any],
        *,
        images: Mapping[str, bytes] | None = None,
        name: str | None = None,
    ) -> Loop | None:
        """Start a loop when the flow's conditions match the result; ``None`` when they do not.

        The matched conditions are recorded in the input as ``humanLoopActivationReasons``. Without a
        name the loop is named by (flow, input hash), and an existing loop for the same input is
        returned even if the result changed since (one review per image per flow).
        """
        activation = flow.activation(summary)
        if not activation.matched:
            return None
        content = dict(input_content)
        content.setdefault(ACTIVATION_REASONS_KEY, builtins.list(activation.reasons))
        loop_name = name or auto_loop_name(flow.name, summary.input_hash)
        try:
            return self.start_loop(flow, loop_name, content, summary.input_hash, images=images)
        except AlreadyExists:
            if name is None:
                existing = self.describe(loop_name)
                if existing.flow == flow.name and existing.input_hash == summary.input_hash:
                    return existing
            raise
