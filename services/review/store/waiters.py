"""Who to wake for a work event: one waiting reviewer per new case of its flow, never every stream.

A review server keeps one :class:`Waiter` per StreamCases subscriber in a :class:`FlowWaiters`, and
feeds it the store's :class:`WorkEvent` s. Waking every stream for every case (what we did first) made
each case cost one lease query per subscriber: p99 101 ms at 200 reviewers. Here:

* **New cases.** A case that became deliverable in flow F wakes the waiter that has waited longest in
  F's queue (a loop with task count 2 wakes two). A waiter that was woken but took nothing although
  the flow still has work (it answered or released that case before, or filled up meanwhile) hands its
  token to the next waiter of F that has not tried it, so a case is never left behind a reviewer who
  cannot take it. With several PostgreSQL replicas each replica wakes one of its own waiters; the one
  that loses the ``SKIP LOCKED`` race finds the queue empty and goes back to sleep without waking more.
* **Free slots.** A reviewer whose lease ended (answered, released, expired, cancelled) wakes its own
  full streams (those waiting for room, not for work).
* **No lost wake-ups.** A stream takes a :meth:`FlowWaiters.snapshot` before it leases; if an event for
  its flows or its reviewer came while the lease query ran, :meth:`FlowWaiters.wait` returns at once.

Single-threaded: call everything from the event loop that runs the streams (store threads bridge with
``loop.call_soon_threadsafe(waiters.dispatch, event)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.review.store.model import ALL_REVIEWERS, WorkEvent


@dataclass
class WakeToken:
    """One new case of ``flow``, handed from waiter to waiter until one takes it (``tried``: who could not)."""

    flow: str
    tried: set[Waiter] = field(default_factory=set)


class Waiter:
    """One subscriber: its reviewer key and flows, and the token that woke it (None: look anyway)."""

    __slots__ = ("_woken", "flows", "full", "reviewer", "token", "waiting")

    def __init__(self, reviewer: str, flows: Sequence[str]) -> None:
        self.reviewer = reviewer
        self.flows = tuple(dict.fromkeys(flows))
        self.token: WakeToken | None = None
        self.waiting = False
        self.full = False
        self._woken = asyncio.Event()


Snapshot = tuple[int, ...]


class FlowWaiters:
    """A FIFO queue of waiting subscribers per flow, plus subscribers waiting for a free slot."""

    def __init__(self) -> None:
        self._queues: dict[str, OrderedDict[Waiter, None]] = {}
        self._full: dict[str, set[Waiter]] = {}
        self._by_reviewer: dict[str, set[Waiter]] = {}
        self._flow_seq: Counter[str] = Counter()
        self._reviewer_seq: Counter[str] = Counter()
        self.wakeups = 0  # how many waiters events woke, for tests and metrics

    # -- subscribers --------------------------------------------------------------------------

    def register(self, reviewer: str, flows: Sequence[str]) -> Waiter:
        waiter = Waiter(reviewer, flows)
        self._by_reviewer.setdefault(reviewer, set()).add(waiter)
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        """A subscriber left; a token it was woken with but never used goes to the next waiter."""
        self._dequeue(waiter)
        mine = self._by_reviewer.get(waiter.reviewer)
        if mine is not None:
            mine.discard(waiter)
            if not mine:
                del self._by_reviewer[waiter.reviewer]
                self._reviewer_seq.pop(waiter.reviewer, None)
        if waiter.token is not None:
            self.decline(waiter, waiter.token)

    def waiting(self, flow: str | None = None) -> int:
        """Subscribers waiting for work (of ``flow``, or of any flow)."""
        if flow is not None:
            return len(self._queues.get(flow, ()))
        return len({w for queue in self._queues.values() for w in queue})

    # -- waiting ------------------------------------------------------------------------------

    def snapshot(self, waiter: Waiter) -> Snapshot:
        """Take before leasing; :meth:`wait` with it returns at once if an event for the waiter came since."""
        return (*(self._flow_seq[f] for f in waiter.flows), self._reviewer_seq[waiter.reviewer])

    async def wait(self, waiter: Waiter, snapshot: Snapshot, *, full: bool, timeout_s: float) -> WakeToken | None:
        """Wait for a case of the waiter's flows (``full``: for a free slot instead) or the timeout.

        Returns the token that woke it, None when it should simply look again (a timeout, an event
        that came while it leased, a free slot). The token stays on the waiter until the caller clears
        it (:meth:`taken`) or hands it on (:meth:`decline`): a subscriber that leaves before either
        passes it on in :meth:`unregister`. The timeout is a safety net and is jittered, so idle
        streams do not all look at once.
        """
        if self.snapshot(waiter) != snapshot:
            return None
        waiter.token = None
        waiter._woken.clear()
        waiter.waiting = True
        waiter.full = full
        if full:
            self._full.setdefault(waiter.reviewer, set()).add(waiter)
        else:
            for flow in waiter.flows:
                self._queues.setdefault(flow, OrderedDict())[waiter] = None
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter._woken.wait(), timeout_s * random.uniform(0.8, 1.0))
        finally:
            self._dequeue(waiter)
        return waiter.token

    @staticmethod
    def taken(waiter: Waiter) -> None:
        """The waiter looked for work after its wake-up (and took some, or the flow has none left)."""
        waiter.token = None

    # -- events -------------------------------------------------------------------------------

    def dispatch(self, event: WorkEvent) -> None:
        """Wake whom ``event`` concerns: per new case one waiter of its flow, and reviewers' full streams."""
        if event.everything:
            for queue in list(self._queues.values()):
                for waiter in list(queue):
                    self._wake(waiter, None)
            for waiters in list(self._full.values()):
                for waiter in list(waiters):
                    self._wake(waiter, None)
            for flow in list(self._flow_seq):
                self._flow_seq[flow] += 1
        for flow, count in event.flows.items():
            self._flow_seq[flow] += 1
            waiting = self._queues.get(flow)
            for _ in range(count):
                if not waiting:
                    break
                self._wake(next(iter(waiting)), WakeToken(flow))
        for reviewer in event.reviewers:
            if reviewer == ALL_REVIEWERS:
                for name in list(self._by_reviewer):
                    self._freed(name)
            elif reviewer in self._by_reviewer:
                self._freed(reviewer)

    def decline(self, waiter: Waiter, token: WakeToken) -> None:
        """``waiter`` was woken by ``token`` but took nothing, and the flow still has work: pass it on."""
        if waiter.token is token:
            waiter.token = None
        token.tried.add(waiter)
        for candidate in self._queues.get(token.flow, ()):
            if candidate not in token.tried:
                self._wake(candidate, token)
                return

    # -- internals ------------------------------------------------------------------------------

    def _freed(self, reviewer: str) -> None:
        self._reviewer_seq[reviewer] += 1
        for waiter in list(self._full.get(reviewer, ())):
            self._wake(waiter, None)

    def _wake(self, waiter: Waiter, token: WakeToken | None) -> None:
        self._dequeue(waiter)
        if token is not None:
            token.tried.add(waiter)
        waiter.token = token
        waiter._woken.set()
        self.wakeups += 1

    def _dequeue(self, waiter: Waiter) -> None:
        if not waiter.waiting:
            return
        waiter.waiting = False
        if waiter.full:
            full = self._full.get(waiter.reviewer)
            if full is not None:
                full.discard(waiter)
                if not full:
                    del self._full[waiter.reviewer]
        else:
            for flow in waiter.flows:
                queue = self._queues.get(flow)
                if queue is not None:
                    queue.pop(waiter, None)
