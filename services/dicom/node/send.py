"""Results out: C-STORE SCU (pynetdicom) and DICOMweb STOW-RS (dicomweb-client), each answer sorted into three.

``sent``: the peer has it (success, or a warning such as coercion). ``retry``: the peer is down, busy or
out of resources, or the connection broke: try again after the backoff. ``refused``: the peer says no
for good (association rejected-permanent, SOP class not supported, not authorised, cannot understand,
HTTP 4xx): trying again cannot help, so the result is moved aside for an operator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from services.dicom.node.destinations import Destination
from services.dicom.node.scp import no_delay
from services.imaging.ingest.quiet import quiet

log = logging.getLogger("medgate.dicom")

SENT, RETRY, REFUSED = "sent", "retry", "refused"
# C-STORE warnings (PS3.4 B.2.3): stored, perhaps changed; and PS3.7 C's attribute warnings.
_WARNINGS = frozenset({0xB000, 0xB006, 0xB007, 0x0107, 0x0116})
# Failures worth another try: out of resources (A7xx), processing failure, resources for the operation.
_RETRY_FAILURES = frozenset({0x0110, 0x0213})


@dataclass(frozen=True)
class Outcome:
    state: str  # sent | retry | refused
    error: str = ""


@dataclass(frozen=True)
class Item:
    """One result for one destination: its key in the ledger and its file."""

    key: str
    path: Path


def cstore_outcome(status: int) -> Outcome:
    if status == 0x0000 or status in _WARNINGS:
        return Outcome(SENT, "" if status == 0 else f"stored with warning 0x{status:04X}")
    if 0xA700 <= status <= 0xA7FF or status in _RETRY_FAILURES:
        return Outcome(RETRY, f"C-STORE status 0x{status:04X}")
    return Outcome(REFUSED, f"C-STORE status 0x{status:04X}")


def _read(path: Path) -> Dataset:
    with quiet():
        return pydicom.dcmread(path)


class CStoreSender:
    """One association per batch to an ``AE@host:port`` destination, with SEG and SR contexts proposed.

    Contexts are proposed per SOP class of the batch with the file's own transfer syntax first, then
    Explicit and Implicit VR Little Endian (dcmtk's plain storescu proposes no SEG or 3D SR context at all).
    """

    def __init__(
        self,
        destination: Destination,
        *,
        ae_title: str,
        acse_timeout_s: float,
        dimse_timeout_s: float,
        network_timeout_s: float,
    ) -> None:
        self.destination = destination
        self.ae_title = ae_title
        self.acse_timeout_s = acse_timeout_s
        self.dimse_timeout_s = dimse_timeout_s
        self.network_timeout_s = network_timeout_s

    def send(self, items: Sequence[Item]) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        datasets: list[tuple[Item, Dataset]] = []
        for item in items:
            try:
                datasets.append((item, _read(item.path)))
            except FileNotFoundError:
                outcomes[item.key] = Outcome(REFUSED, "the result file is missing from the outbox")
        if not datasets:
            return outcomes
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = self.acse_timeout_s
        ae.dimse_timeout = self.dimse_timeout_s
        ae.network_timeout = self.network_timeout_s
        syntaxes: dict[str, list[str]] = {}
        for _, ds in datasets:
            own = str(ds.file_meta.TransferSyntaxUID)
            offered = syntaxes.setdefault(str(ds.SOPClassUID), [])
            for uid in (own, str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)):
                if uid not in offered:
                    offered.append(uid)
        for sop_class, offered in syntaxes.items():
            ae.add_requested_context(sop_class, offered)
        target = self.destination
        assoc = ae.associate(
            target.host, target.port, ae_title=target.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)]
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                primitive = assoc.acceptor.primitive
                result = getattr(primitive, "result", None)
                diagnostic = getattr(primitive, "diagnostic", None)
                source = getattr(primitive, "result_source", None)
                text = f"association rejected (result {result}, source {source}, reason {diagnostic})"
                state = REFUSED if result == 0x01 else RETRY
            elif assoc.is_aborted:
                text, state = "association aborted", RETRY
            else:
                text, state = "no association (the peer cannot be reached)", RETRY
            for item, _ in datasets:
                outcomes[item.key] = Outcome(state, text)
            return outcomes
        try:
            for message_id, (item, ds) in enumerate(datasets, start=1):
                if not assoc.is_established:
                    outcomes[item.key] = Outcome(RETRY, "the association ended before this result was sent")
                    continue
                try:
                    status = assoc.send_c_store(ds, msg_id=message_id)
                except ValueError:  # no accepted presentation context for this SOP class and transfer syntax
                    outcomes[item.key] = Outcome(
                        REFUSED, f"the peer accepted no presentation context for {ds.SOPClassUID}"
                    )
                    continue
                if "Status" not in status:  # no answer: timeout, abort or a lost connection
                    outcomes[item.key] = Outcome(RETRY, "no C-STORE response (timeout or connection lost)")
                    continue
                outcomes[item.key] = cstore_outcome(int(status.Status))
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes


class StowSender:
    """One STOW-RS request per batch (``dicomweb-client``)."""

    def __init__(self, destination: Destination, *, timeout_s: float) -> None:
        self.destination = destination
        self.timeout_s = timeout_s

    def send(self, items: Sequence[Item]) -> dict[str, Outcome]:
        import requests
        from dicomweb_client.api import DICOMwebClient

        outcomes: dict[str, Outcome] = {}
        batch: list[tuple[Item, Dataset]] = []
        for item in items:
            try:
                batch.append((item, _read(item.path)))
            except FileNotFoundError:
                outcomes[item.key] = Outcome(REFUSED, "the result file is missing from the outbox")
        if not batch:
            return outcomes
        client = DICOMwebClient(url=self.destination.url, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff and its limit
        try:
            answer = client.store_instances(datasets=[ds for _, ds in batch])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            state = RETRY if code in {0, 408, 429} or code >= 500 else REFUSED
            for item, _ in batch:
                outcomes[item.key] = Outcome(state, f"STOW-RS HTTP {code}")
            return outcomes
        except (requests.RequestException, OSError) as exc:
            for item, _ in batch:
                outcomes[item.key] = Outcome(RETRY, f"STOW-RS request failed ({type(exc).__name__})")
            return outcomes
        failed = {}
        for entry in getattr(answer, "FailedSOPSequence", []) or []:
            failed[str(entry.get("ReferencedSOPInstanceUID", ""))] = int(entry.get("FailureReason", 0x0110))
        for item, ds in batch:
            reason = failed.get(str(ds.SOPInstanceUID))
            outcomes[item.key] = Outcome(SENT) if reason is None else cstore_outcome(reason)
        return outcomes
