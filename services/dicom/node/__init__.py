"""The DICOM node: a Storage SCP whose routed instances are analysed by the gateway and answered as SEG and SR.

Started by ``medgate serve`` beside the gateway (``dicom.enabled``); settings ``dicom.*``; routing
rules in ``config/dicom_routes.toml``. Modules: :mod:`.scp` (pynetdicom Storage SCP and C-ECHO),
:mod:`.inspect` (does a received object parse), :mod:`.routes` (rules), :mod:`.spool` (files and
ledger: nothing lost, nothing sent twice), :mod:`.analyze` (the gateway call), :mod:`.send` (C-STORE
SCU and STOW-RS), :mod:`.node` (:class:`~.node.DicomNode`, the threads that tie them together).

This package's own namespace stays light (the command line imports it for every command); pynetdicom
and the rest load when a node starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.dicom.node.node import DicomNode
    from services.settings import Settings

__all__ = ["NodeStartError", "node_for"]


class NodeStartError(RuntimeError):
    """The DICOM node cannot start as configured (rules, destinations, address, network policy); says why."""


@contextlib.contextmanager
def node_for(settings: Settings) -> Iterator[DicomNode | None]:
    """The DICOM node for the length of the block when ``dicom.enabled``, else None (what ``medgate serve`` uses)."""
    if not settings.dicom.enabled:
        yield None
        return
    from services.dicom.node.destinations import DestinationError
    from services.dicom.node.node import DicomNode
    from services.dicom.node.routes import RouteError

    dicom = settings.dicom
    try:
        node = DicomNode(settings)
    except (RouteError, DestinationError) as exc:
        raise NodeStartError(f"DICOM node: {exc}") from None
    try:
        node.start()
    except OSError as exc:
        node.stop()
        raise NodeStartError(
            f"DICOM node cannot listen on {dicom.host}:{dicom.port}: {exc.strerror or exc} (MEDGATE_DICOM_PORT, "
            "or MEDGATE_DICOM_ENABLED=false)"
        ) from None
    except RuntimeError as exc:
        node.stop()
        raise NodeStartError(f"DICOM node: {exc}") from None
    try:
        yield node
    finally:
        node.stop()
