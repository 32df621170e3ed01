"""The Storage SCP: every standard storage SOP class in every transfer syntax pynetdicom knows, and C-ECHO.

pynetdicom's way: events are bound as ``[(evt.EVT_C_STORE, handler)]`` and a handler answers with a
status. Association checks (calling and called AE titles) run on ``EVT_REQUESTED``, before any
context is negotiated; the association limit is pynetdicom's own (rejected transient, local limit
exceeded). Each C-STORE is answered only after the object is parsed, routed and, when routed, on disk
with its ledger row (at-least-once for the sender):

====================  ==============================================================================
0x0000 Success        kept for analysis, or no route matched it (ignored, logged with its UIDs)
0xA700 Out of         less than ``dicom.min_free_disk_bytes`` free, or the object could not be written
       Resources
0xA900 Mismatch       the data set's SOP class or instance UID is not the request's (quarantined)
0xC210 Cannot         the data set cannot be parsed, is truncated, or lacks its UIDs (quarantined)
       understand
====================  ==============================================================================
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from services.dicom.node.analyze import route_request
from services.dicom.node.inspect import Mismatch, Unreadable, inspect_part10
from services.dicom.node.routes import RoutesFile
from services.dicom.node.spool import Instance, Spool, is_uid
from services.imaging.limits import IngestLimits
from services.settings import DicomSettings, SecuritySettings

log = logging.getLogger("medgate.dicom")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
# A-ASSOCIATE-RJ: rejected-permanent (1), by the service user (1), calling (3) / called (7) AE title not recognised.
_REJECT_CALLING = (0x01, 0x01, 0x03)
_REJECT_CALLED = (0x01, 0x01, 0x07)


def _titles(event: evt.Event) -> tuple[str, str]:
    """The calling and called AE titles the peer's A-ASSOCIATE request named."""
    primitive: Any = event.assoc.requestor.primitive
    return str(primitive.calling_ae_title).strip(), str(primitive.called_ae_title).strip()


def no_delay(event: evt.Event) -> None:
    """TCP_NODELAY on an association's socket (pynetdicom leaves Nagle on).

    With Nagle on, each C-STORE waits out the peer's delayed ACK: 50 ms per 39 KB instance on loopback
    here, 8 ms with it off on both ends.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reject(event: evt.Event, reason: tuple[int, int, int]) -> None:
    """A-ASSOCIATE-RJ, then wait for the peer to close, as pynetdicom's own rejections do (else the socket is shut
    before the RJ PDU leaves, and the peer sees an abort instead of the reason)."""
    event.assoc.acse.send_reject(*reason)
    event.assoc.kill()


def ae_titles(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class ScpStats:
    """Counts since start, for tests and the start-up log."""

    received: int = 0
    routed: int = 0
    ignored: int = 0
    quarantined: int = 0
    refused_disk: int = 0
    rejected_associations: int = 0


class StorageScp:
    """The SCP's handlers and its pynetdicom server; ``on_routed`` is told the series of each kept instance."""

    def __init__(
        self,
        settings: DicomSettings,
        security: SecuritySettings,
        spool: Spool,
        routes: RoutesFile,
        limits: IngestLimits,
        *,
        on_routed: Callable[[str], None] = lambda series: None,
    ) -> None:
        self.settings = settings
        self.security = security
        self.spool = spool
        self.routes = routes
        self.limits = limits
        self.on_routed = on_routed
        self.calling = ae_titles(settings.allowed_calling_aes)
        self.called = ae_titles(settings.allowed_called_aes) or [settings.ae_title.strip()]
        self.stats = ScpStats()
        self._server: Any = None
        self._routes_error_logged = ""

    # Association --------------------------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        calling, called = _titles(event)
        if self.calling and calling not in self.calling:
            self.stats.rejected_associations += 1
            log.warning("association rejected: calling AE %r is not in dicom.allowed_calling_aes", calling)
            _reject(event, _REJECT_CALLING)
        elif called not in self.called:
            self.stats.rejected_associations += 1
            log.warning("association rejected: called AE %r is not this node's (dicom.allowed_called_aes)", called)
            _reject(event, _REJECT_CALLED)

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # C-STORE ------------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int:
        request: Any = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        shown = sop_instance if is_uid(sop_instance) else "(not a UID)"
        calling, called = _titles(event)
        self.stats.received += 1
        data = event.encoded_dataset(include_meta=True)
        try:
            free = shutil.disk_usage(self.spool.store_dir).free
        except OSError:
            free = 0
        if free - len(data) < self.settings.min_free_disk_bytes:
            self.stats.refused_disk += 1
            log.warning(
                "C-STORE refused (out of resources): %d bytes free, dicom.min_free_disk_bytes %d; sop_instance_uid=%s",
                free,
                self.settings.min_free_disk_bytes,
                shown,
            )
            return OUT_OF_RESOURCES
        routes = self.routes.current()
        if self.routes.last_error and self.routes.last_error != self._routes_error_logged:
            self._routes_error_logged = self.routes.last_error
            log.error("routing rules changed but cannot be used (the previous rules stay): %s", self.routes.last_error)
        try:
            found = inspect_part10(
                data,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                keywords=routes.keywords(),
                limits=self.limits,
            )
        except (Unreadable, Mismatch) as exc:
            status = MISMATCH if isinstance(exc, Mismatch) else CANNOT_UNDERSTAND
            return self._quarantine(
                data, status, str(exc), sop_class=sop_class, sop_instance=sop_instance, calling=calling
            )
        route = routes.match(found.header, calling_ae=calling, called_ae=called)
        if route is None:
            self.stats.ignored += 1
            log.info(
                "no route: ignored sop_instance_uid=%s series_instance_uid=%s sop_class_uid=%s calling_ae=%r",
                found.sop_instance_uid,
                found.series_instance_uid,
                found.sop_class_uid,
                calling,
            )
            return SUCCESS
        instance = Instance(
            sop_instance_uid=found.sop_instance_uid,
            series_instance_uid=found.series_instance_uid,
            study_instance_uid=found.study_instance_uid,
            sop_class_uid=found.sop_class_uid,
            route=route.name,
            request=route_request(route),
            calling_ae=calling,
            received_at=time.time(),
        )
        try:
            kept = self.spool.receive(instance, data)
        except OSError as exc:
            log.error("C-STORE refused (out of resources): cannot keep sop_instance_uid=%s (%s)", shown, exc.strerror)
            return OUT_OF_RESOURCES
        if not kept:
            log.info(
                "already analysed (or quarantined): sop_instance_uid=%s series_instance_uid=%s; not analysed again",
                found.sop_instance_uid,
                found.series_instance_uid,
            )
            return SUCCESS
        self.stats.routed += 1
        log.info(
            "received sop_instance_uid=%s series_instance_uid=%s route=%s calling_ae=%r",
            found.sop_instance_uid,
            found.series_instance_uid,
            route.name,
            calling,
        )
        self.on_routed(found.series_instance_uid)
        return SUCCESS

    def _quarantine(
        self, data: bytes, status: int, reason: str, *, sop_class: str, sop_instance: str, calling: str
    ) -> int:
        self.stats.quarantined += 1
        details = {
            "reason": reason,
            "status": f"0x{status:04X}",
            "calling_ae": calling,
            "sop_class_uid": sop_class if is_uid(sop_class) else "",
            "sop_instance_uid": sop_instance if is_uid(sop_instance) else "",
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            path = self.spool.quarantine(data, details, uid=sop_instance)
        except OSError as exc:
            log.error("cannot quarantine a refused object (%s)", exc.strerror)
            path = None
        log.warning(
            "C-STORE refused with 0x%04X and quarantined (%s): sop_instance_uid=%s calling_ae=%r -> %s",
            status,
            reason,
            details["sop_instance_uid"] or "(not a UID)",
            calling,
            path.name if path else "(not kept)",
        )
        return status

    # Server -------------------------------------------------------------------------------------

    def build_ae(self) -> AE:
        settings = self.settings
        ae = AE(ae_title=settings.ae_title.strip())
        ae.maximum_associations = settings.max_associations
        ae.acse_timeout = settings.acse_timeout_s
        ae.dimse_timeout = settings.dimse_timeout_s
        ae.network_timeout = settings.network_timeout_s
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES[:4])
        return ae

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.security.cert_file), str(self.security.key_file))
        if self.security.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self.security.client_ca_file))
        return context

    def start(self, *, port: int | None = None) -> int:
        """Listen (``port`` 0: a free one); returns the bound port."""
        ae = self.build_ae()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        address = (self.settings.host, self.settings.port if port is None else port)
        self._server = ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=self.ssl_context())
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
