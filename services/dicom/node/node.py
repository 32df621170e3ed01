"""The DICOM node: the Storage SCP, the series scheduler, the gateway calls and the outbox, as threads.

pynetdicom is thread-based, so the node is too: the SCP's association threads keep what arrives;
one scheduler thread hands each instance whose series has been quiet for ``dicom.quiet_period_s`` to
``dicom.analyze_workers`` threads, which call the gateway's Analyze with ``output.dicom_results``; one
delivery thread per destination sends the SEG and SR on. All state that matters is in the
:class:`~services.dicom.node.spool.Spool` (files and ledger), so a restart picks up where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from services.dicom.node.analyze import AnalyzeFailed, GatewayClient
from services.dicom.node.destinations import Destination, parse_destinations
from services.dicom.node.handover import inbox_dir, read_identity
from services.dicom.node.routes import RoutesFile
from services.dicom.node.scp import StorageScp, ae_titles
from services.dicom.node.send import REFUSED, RETRY, SENT, CStoreSender, Item, Outcome, StowSender
from services.dicom.node.spool import Delivery, Instance, Result, Spool
from services.metrics import DICOM_OUTBOX_PENDING, DICOM_SEND_FAILURES, DICOM_SENT
from services.rpc.tls import check_plaintext_allowed, is_loopback
from services.settings import Settings

log = logging.getLogger("medgate.dicom")

# How many results one association (or one STOW-RS request) carries.
SEND_BATCH = 50
# The source recorded for results that were handed over rather than built from a received instance.
HANDED_OVER = "handed-over"
# The scheduler looks for quiet series at least this often (it is also woken by each arrival).
SCHEDULER_TICK_S = 0.25


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """``base_s`` doubled per attempt, at most ``max_s``, with 10% jitter so many results do not retry in step."""
    delay = min(max_s, base_s * (2 ** max(0, attempts - 1)))
    return float(delay * random.uniform(0.9, 1.1))


class DicomNode:
    """``start()`` returns the SCP's port; ``stop()`` stops accepting, lets running calls end, and closes."""

    def __init__(self, settings: Settings, *, gateway: GatewayClient | None = None) -> None:
        self.settings = settings
        dicom = settings.dicom
        self.destinations: list[Destination] = parse_destinations(dicom.destination, dicom.stow_url)
        self.routes = RoutesFile(dicom.routes_file)
        self.spool = Spool(dicom.store_dir, dicom.outbox_dir, dicom.quarantine_dir)
        self.gateway = gateway or GatewayClient.from_settings(settings)
        self.scp = StorageScp(
            dicom, settings.security, self.spool, self.routes, settings.ingest, on_routed=self._arrived
        )
        self.port = 0
        self._stop = threading.Event()
        self._work = threading.Event()
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(dicom.analyze_workers, thread_name_prefix="medgate-dicom-analyze")
        self._threads: list[threading.Thread] = []
        self._wake: dict[str, threading.Event] = {d.key: threading.Event() for d in self.destinations}

    # Lifecycle ----------------------------------------------------------------------------------

    def _check_network(self) -> None:
        dicom = self.settings.dicom
        if is_loopback(dicom.host):
            return
        if not dicom.tls:
            check_plaintext_allowed(dicom.host, self.settings.security)
        if not ae_titles(dicom.allowed_calling_aes):
            raise RuntimeError(
                f"refusing to serve DICOM on {dicom.host} without dicom.allowed_calling_aes: any device on the "
                "network could store to it (list the modalities' and PACS's AE titles)"
            )

    def start(self, *, port: int | None = None) -> int:
        self._check_network()
        pynetdicom_log = logging.getLogger("pynetdicom")
        if pynetdicom_log.level == logging.NOTSET:  # a line per association and per message at INFO: keep problems only
            pynetdicom_log.setLevel(logging.WARNING)
        tidied = self.spool.recover()
        if any(tidied.values()):
            log.info("outbox recovered after a stop: %s", tidied)
        keys = {d.key for d in self.destinations}
        for key, count in self._pending_elsewhere(keys):
            log.warning("%d result(s) wait for %s, which is no longer configured: left in the outbox", count, key)
        self.port = self.scp.start(port=port)
        self._threads = [threading.Thread(target=self._schedule, name="medgate-dicom-scheduler", daemon=True)]
        for destination in self.destinations:
            self._threads.append(
                threading.Thread(
                    target=self._deliver, args=(destination,), name=f"medgate-dicom-send-{destination}", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()
        dicom = self.settings.dicom
        sent_to = ", ".join(str(d) for d in self.destinations) or "nowhere (results are kept in the outbox)"
        log.info(
            "DICOM node %s serving on %s:%d (%d routes, quiet period %.1f s); analysing through %s; results to %s",
            dicom.ae_title,
            dicom.host,
            self.port,
            len(self.routes.routes.routes),
            dicom.quiet_period_s,
            self.gateway.target,
            sent_to,
        )
        if not self.destinations:
            log.warning("no DICOM destination: set MEDGATE_DICOM_DESTINATION=AE@host:port or MEDGATE_DICOM_STOW_URL")
        return self.port

    def _pending_elsewhere(self, keys: set[str]) -> list[tuple[str, int]]:
        return sorted((key, count) for key, count in self.spool.pending_by_destination().items() if key not in keys)

    def stop(self) -> None:
        self.scp.stop()
        self._stop.set()
        self._work.set()
        for event in self._wake.values():
            event.set()
        for thread in self._threads:
            thread.join(timeout=max(self.settings.dicom.network_timeout_s, 5.0))
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.gateway.close()
        self.spool.close()
        log.info("DICOM node stopped")

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Analysis -----------------------------------------------------------------------------------

    def _arrived(self, series_instance_uid: str) -> None:
        self._work.set()

    def _schedule(self) -> None:
        quiet = self.settings.dicom.quiet_period_s
        while not self._stop.is_set():
            self._work.wait(timeout=SCHEDULER_TICK_S if quiet > 0 else 1.0)
            self._work.clear()
            if self._stop.is_set():
                return
            try:
                self._take_handed_over()
                with self._in_flight_lock:
                    exclude = set(self._in_flight)
                for instance in self.spool.due_instances(now=time.time(), quiet_period_s=quiet, exclude=exclude):
                    with self._in_flight_lock:
                        self._in_flight.add(instance.sop_instance_uid)
                    self._executor.submit(self._analyze, instance)
            except RuntimeError:  # the executor was shut down under us: stopping
                return
            except Exception:
                log.exception("DICOM scheduler pass failed; trying again")
                time.sleep(1.0)

    def _take_handed_over(self) -> None:
        """Objects put in the inbox by :func:`~services.dicom.node.handover.hand_over` (verified results)."""
        for path in sorted(inbox_dir(self.spool.outbox_dir).glob("*.dcm")):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                found = read_identity(data)
            except Exception as exc:  # not DICOM, or no UIDs: kept for an operator, never sent
                target = self.spool.quarantine(
                    data, {"reason": f"handed-over object unreadable ({type(exc).__name__})"}
                )
                path.unlink(missing_ok=True)
                log.error("a handed-over object could not be read: moved to %s", target.name)
                continue
            result = Result(
                sop_instance_uid=found["SOPInstanceUID"],
                kind=found["Modality"] or "?",
                sop_class_uid=found["SOPClassUID"],
                series_instance_uid=found["SeriesInstanceUID"],
                study_instance_uid=found["StudyInstanceUID"],
                data=data,
            )
            self.spool.enqueue(HANDED_OVER, [result], [d.key for d in self.destinations])
            path.unlink(missing_ok=True)
            log.info("handed over: %s %s, to be sent on", result.kind, result.sop_instance_uid)
            for event in self._wake.values():
                event.set()

    def _analyze(self, instance: Instance) -> None:
        uid = instance.sop_instance_uid
        try:
            if self._stop.is_set():
                return
            try:
                data = self.spool.instance_path(uid).read_bytes()
            except FileNotFoundError:
                self.spool.fail_instance(uid, {"reason": "the received file is missing", "sop_instance_uid": uid})
                return
            started = time.perf_counter()
            try:
                answer = self.gateway.analyze(data, instance.request, request_id=f"dicom-{uid}"[:64])
            except AnalyzeFailed as exc:
                self._analysis_failed(instance, exc)
                return
            results = [
                Result(
                    sop_instance_uid=obj.sop_instance_uid,
                    kind=obj.kind,
                    sop_class_uid=obj.sop_class_uid,
                    series_instance_uid=obj.series_instance_uid,
                    study_instance_uid=instance.study_instance_uid,
                    data=obj.data,
                )
                for obj in answer.dicom_results
            ]
            self.spool.analysed(uid, results, [d.key for d in self.destinations])
            log.info(
                "analysed sop_instance_uid=%s route=%s in %.0f ms: %s",
                uid,
                instance.route,
                (time.perf_counter() - started) * 1000,
                ", ".join(f"{r.kind} {r.sop_instance_uid}" for r in results),
            )
            for event in self._wake.values():
                event.set()
        except Exception:
            log.exception("analysing sop_instance_uid=%s failed unexpectedly; it stays queued", uid)
            with contextlib.suppress(Exception):
                self._retry_instance(instance, "internal error")
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(uid)
            self._work.set()

    def _retry_instance(self, instance: Instance, error: str) -> None:
        dicom = self.settings.dicom
        attempts = instance.attempts + 1
        if attempts >= dicom.max_attempts:
            path = self.spool.fail_instance(
                instance.sop_instance_uid,
                {
                    "reason": f"gave up after {attempts} attempts: {error}",
                    "sop_instance_uid": instance.sop_instance_uid,
                },
            )
            log.error(
                "gave up analysing sop_instance_uid=%s after %d attempts: quarantined as %s",
                instance.sop_instance_uid,
                attempts,
                path.name,
            )
            return
        delay = backoff_s(attempts, dicom.retry_backoff_s, dicom.retry_backoff_max_s)
        self.spool.retry_instance(
            instance.sop_instance_uid, attempts=attempts, next_at=time.time() + delay, error=error
        )

    def _analysis_failed(self, instance: Instance, exc: AnalyzeFailed) -> None:
        uid = instance.sop_instance_uid
        if exc.transient:
            log.warning("Analyze of sop_instance_uid=%s: %s; trying again later", uid, exc.code)
            self._retry_instance(instance, exc.code)
            return
        reason = {
            "reason": f"the gateway refused it: {exc.code}",
            "details": exc.details,
            "route": instance.route,
            "sop_instance_uid": uid,
            "series_instance_uid": instance.series_instance_uid,
            "sop_class_uid": instance.sop_class_uid,
            "calling_ae": instance.calling_ae,
        }
        path = self.spool.fail_instance(uid, reason)
        log.warning("Analyze of sop_instance_uid=%s refused (%s): quarantined as %s", uid, exc.code, path.name)

    # Delivery -----------------------------------------------------------------------------------

    def _sender(self, destination: Destination) -> CStoreSender | StowSender:
        dicom = self.settings.dicom
        if destination.kind == "stow":
            return StowSender(destination, timeout_s=dicom.network_timeout_s)
        return CStoreSender(
            destination,
            ae_title=dicom.ae_title.strip(),
            acse_timeout_s=dicom.acse_timeout_s,
            dimse_timeout_s=dicom.dimse_timeout_s,
            network_timeout_s=dicom.network_timeout_s,
        )

    def _deliver(self, destination: Destination) -> None:
        wake = self._wake[destination.key]
        sender = self._sender(destination)
        pending = DICOM_OUTBOX_PENDING.labels(destination=str(destination))
        while not self._stop.is_set():
            try:
                pending.set(self.spool.pending_by_destination().get(destination.key, 0))
                due = self.spool.due_deliveries(now=time.time(), destinations=[destination.key])
                if due:
                    self._send_batch(destination, sender, due[:SEND_BATCH])
                    continue
                upcoming = self.spool.next_delivery_at([destination.key])
                timeout = 5.0 if upcoming is None else min(5.0, max(0.05, upcoming - time.time()))
            except Exception:
                log.exception("delivery to %s failed unexpectedly; trying again", destination)
                timeout = 5.0
            wake.wait(timeout=timeout)
            wake.clear()

    def _send_batch(self, destination: Destination, sender: CStoreSender | StowSender, due: list[Delivery]) -> None:
        items = [Item(d.result_uid, self.spool.result_path(d.result_uid)) for d in due]
        outcomes = sender.send(items)
        dicom = self.settings.dicom
        sent = retried = refused = 0
        for delivery in due:
            outcome = outcomes.get(delivery.result_uid, Outcome(RETRY, "no outcome"))
            if outcome.state == SENT:
                self.spool.sent(delivery)
                sent += 1
            elif outcome.state == RETRY and delivery.attempts + 1 < dicom.max_attempts:
                delay = backoff_s(delivery.attempts + 1, dicom.retry_backoff_s, dicom.retry_backoff_max_s)
                self.spool.retry_delivery(delivery, next_at=time.time() + delay, error=outcome.error)
                retried += 1
            else:
                error = (
                    outcome.error
                    if outcome.state == REFUSED
                    else f"gave up after {delivery.attempts + 1} attempts: {outcome.error}"
                )
                path = self.spool.refuse(delivery, error=error)
                refused += 1
                log.error(
                    "%s refused %s %s for good (%s): moved to %s",
                    destination,
                    delivery.kind,
                    delivery.result_uid,
                    error,
                    path.parent,
                )
        DICOM_SENT.labels(destination=str(destination)).inc(sent)
        DICOM_SEND_FAILURES.labels(destination=str(destination), outcome="retry").inc(retried)
        DICOM_SEND_FAILURES.labels(destination=str(destination), outcome="refused").inc(refused)
        if sent:
            log.info("sent %d result(s) to %s", sent, destination)
        if retried:
            errors = sorted({o.error for o in outcomes.values() if o.state == RETRY})
            log.warning("%d result(s) for %s wait for another try: %s", retried, destination, "; ".join(errors))
        if refused:
            log.error("%d result(s) for %s moved aside for an operator", refused, destination)

    # Inspection ---------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return self.spool.counts()
