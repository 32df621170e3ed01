"""The DICOM node: a Storage SCP whose routed instances are analysed by the gateway and answered as SEG and SR.

Started by ``medgate serve`` beside the gateway (``dicom.enabled``); settings ``dicom.*``; routing
rules in ``config/dicom_routes.toml``. Modules: :mod:`.scp` (pynetdicom Storage SCP and C-ECHO),
:mod:`.inspect` (does a received object parse), :mod:`.routes` (rules), :mod:`.spool` (files and
ledger: nothing lost, nothing sent twice), :mod:`.analyze` (the gateway call), :mod:`.send` (C-STORE
SCU and STOW-RS), :mod:`.node` (the threads that tie them together).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.dicom.node.destinations import Destination, DestinationError, parse_destinations
from services.dicom.node.node import DicomNode
from services.dicom.node.routes import Route, RouteError, Routes, load_routes
from services.settings import Settings

__all__ = [
    "Destination",
    "DestinationError",
    "DicomNode",
    "Route",
    "RouteError",
    "Routes",
    "load_routes",
    "node_for",
    "parse_destinations",
]


@contextlib.contextmanager
def node_for(settings: Settings) -> Iterator[DicomNode | None]:
    """The DICOM node for the length of the block when ``dicom.enabled``, else None (what ``medgate serve`` uses)."""
    if not settings.dicom.enabled:
        yield None
        return
    node = DicomNode(settings)
    node.start()
    try:
        yield node
    finally:
        node.stop()
