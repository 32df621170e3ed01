"""The audit trail: DICOM PS3.15 A.5-shaped events (``events``) and their append-only, fsynced writer (``log``)."""

from services.audit.events import (
    Action,
    ActiveParticipant,
    Application,
    AuditEvent,
    EventID,
    EventType,
    Flow,
    HumanLoop,
    Outcome,
    ParticipantRole,
    Query,
    SecurityResource,
    Study,
    application_activity,
    export_event,
    node,
    requestor,
)
from services.audit.log import AuditLog, AuditWriteError

__all__ = [
    "Action",
    "ActiveParticipant",
    "Application",
    "AuditEvent",
    "AuditLog",
    "AuditWriteError",
    "EventID",
    "EventType",
    "Flow",
    "HumanLoop",
    "Outcome",
    "ParticipantRole",
    "Query",
    "SecurityResource",
    "Study",
    "application_activity",
    "export_event",
    "node",
    "requestor",
]
