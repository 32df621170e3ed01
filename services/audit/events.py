"""Audit events shaped as DICOM PS3.15 Annex A.5 audit messages: typed, coded, and free of patient data by construction.

An event says who (active participants), did what (event id, type and action) to which objects
(participant objects), when (UTC, milliseconds) and how it ended (outcome and the gRPC code name).
No field takes free text: objects are DICOM UIDs or human-loop and flow names, each checked against
its grammar, and a value that does not match is refused here, so a patient's name that found its
way into a StudyInstanceUID or a loop name can never be written (the RPC layer drops such an
object and keeps the event). Nothing here imports gRPC.

>>> event = AuditEvent(
...     event_id=EventID.INSTANCES_ACCESSED, action=Action.READ, status="OK",
...     participants=(requestor(user_id="dr-lee", issuer="https://idp/realms/h", peer="ipv4:10.0.0.7:51234"),),
...     objects=(Study("1.2.840.113619.2.55.3", instances=(("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"),)),),
... )
>>> event.outcome
<Outcome.SUCCESS: 0>
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, IntEnum, StrEnum
from typing import Any, NamedTuple


class Code(NamedTuple):
    """A coded value (PS3.15's ``CodedValueType``): code, coding scheme, meaning."""

    code: str
    scheme: str
    meaning: str

    def as_json(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.scheme, "originalText": self.meaning}


class EventID(Enum):
    """EventID (PS3.15 A.5.3 and CID 400 "Audit Event ID")."""

    APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
    AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
    INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
    EXPORT = Code("110106", "DCM", "Export")
    QUERY = Code("110112", "DCM", "Query")
    SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
    USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")


class EventType(Enum):
    """EventTypeCode (CID 401 "Audit Event Type Code")."""

    APPLICATION_START = Code("110120", "DCM", "Application Start")
    APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
    LOGIN = Code("110122", "DCM", "Login")
    NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
    SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
    SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
    USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
    AUDIT_RECORDING_STARTED = Code("110134", "DCM", "Audit Recording Started")


class Action(StrEnum):
    """EventActionCode: Create, Read, Update, Delete, Execute."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # the action was refused or cut short; the caller can correct it and retry
    SERIOUS_FAILURE = 8  # the action was refused (authentication, authorization) or could not be done
    MAJOR_FAILURE = 12  # a fault of ours (a bug, lost data)


class ParticipantRole(Enum):
    """RoleIDCode of an active participant (CID 402 "Audit Active Participant Role ID Code")."""

    APPLICATION = Code("110150", "DCM", "Application")
    APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
    DESTINATION = Code("110152", "DCM", "Destination Role ID")
    SOURCE = Code("110153", "DCM", "Source Role ID")
    DESTINATION_MEDIA = Code("110154", "DCM", "Destination Media")


# The only outcome descriptions there are: gRPC's status code names (an error *message* could quote input).
STATUS_NAMES = frozenset(
    {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    }
)  # fmt: skip
_MINOR = frozenset(
    {"CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
    | {"OUT_OF_RANGE", "ABORTED"}
)
_MAJOR = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


def outcome_for(status: str) -> Outcome:
    """The outcome indicator of a gRPC status name: the caller's mistakes are minor, refusals serious, bugs major."""
    if status not in STATUS_NAMES:
        raise ValueError(f"{status!r} is not a gRPC status code name")
    if status == "OK":
        return Outcome.SUCCESS
    if status in _MINOR:
        return Outcome.MINOR_FAILURE
    if status in _MAJOR:
        return Outcome.MAJOR_FAILURE
    return Outcome.SERIOUS_FAILURE


# DICOM UIDs (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
# Human-loop and flow names as A2I (and the review store) accept them.
_NAME = re.compile(r"^[a-z0-9](-*[a-z0-9])*$")
_MAX_NAME_CHARS = 63
# Request ids as the request-id interceptor accepts them; RPC names as gRPC spells them.
_TOKEN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_RPC = re.compile(r"^/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*$")
_MAX_PARTICIPANT_CHARS = 256


def is_uid(value: str) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def is_name(value: str) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME_CHARS and bool(_NAME.match(value))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{what} does not match its grammar")  # never quote the value: it may be patient data


def _check_participant_text(value: str, what: str) -> None:
    """Identifiers of staff and systems (token subjects, certificate subjects, addresses): printable, bounded."""
    _check(isinstance(value, str) and len(value) <= _MAX_PARTICIPANT_CHARS and value.isprintable(), what)


@dataclass(frozen=True)
class ActiveParticipant:
    """A user or process taking part (PS3.15 ``ActiveParticipant``); never a patient.

    ``user_id`` is a token's subject, an OS user, a certificate subject or a process name;
    ``alternative_user_id`` the token's issuer (for a process, its pid); ``network_access_point``
    an IP address or host name.
    """

    user_id: str
    user_is_requestor: bool
    alternative_user_id: str = ""
    user_name: str = ""
    roles: tuple[Code, ...] = ()
    network_access_point: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.user_id), "ActiveParticipant.UserID")
        for name in ("user_id", "alternative_user_id", "user_name", "network_access_point"):
            _check_participant_text(getattr(self, name), f"ActiveParticipant.{name}")
        for role in self.roles:
            _check_participant_text(role.code, "ActiveParticipant.RoleIDCode")

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"UserID": self.user_id, "UserIsRequestor": self.user_is_requestor}
        if self.alternative_user_id:
            entry["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            entry["UserName"] = self.user_name
        if self.roles:
            entry["RoleIDCode"] = [role.as_json() for role in self.roles]
        if self.network_access_point:
            ip = _looks_like_ip(self.network_access_point)
            entry["NetworkAccessPointID"] = self.network_access_point
            entry["NetworkAccessPointTypeCode"] = "2" if ip else "1"  # 2: IP address, 1: machine name
        return entry


def _looks_like_ip(address: str) -> bool:
    return bool(re.match(r"^[0-9.]+$", address)) or ":" in address


def peer_address(peer: str) -> str:
    """The host part of gRPC's peer string: ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``, ``ipv6:[::1]:5`` -> ``::1``."""
    if peer.startswith("ipv4:"):
        return peer[5:].rpartition(":")[0] or peer[5:]
    if peer.startswith("ipv6:"):
        host = peer[5:]
        if host.startswith("[") and "]" in host:
            return host[1 : host.index("]")]
        return host
    return peer.split(":", 1)[0]  # "unix:/path" -> "unix": the socket path says nothing about the caller


def role_code(role: str) -> Code:
    return Code(role, "medgate-role", role)


def requestor(
    *,
    user_id: str = "",
    issuer: str = "",
    name: str = "",
    roles: tuple[str, ...] | frozenset[str] = (),
    peer: str = "",
    extra_roles: tuple[Code, ...] = (),
) -> ActiveParticipant:
    """The caller: a token's subject and issuer with its roles, or ``anonymous`` when none was established."""
    return ActiveParticipant(
        user_id=user_id or "anonymous",
        user_is_requestor=True,
        alternative_user_id=issuer,
        user_name=name,
        roles=(*extra_roles, *(role_code(role) for role in sorted(roles))),
        network_access_point=peer_address(peer) if peer else "",
    )


def node(subject: str, *, peer: str = "") -> ActiveParticipant:
    """The calling machine as its client certificate names it (mutual TLS node authentication)."""
    return ActiveParticipant(
        user_id=subject,
        user_is_requestor=True,
        roles=(ParticipantRole.SOURCE.value,),
        network_access_point=peer_address(peer) if peer else "",
    )


@dataclass(frozen=True)
class Application:
    """This process as an audit participant: ``medgate-gateway`` on a host, with its pid."""

    name: str
    host: str
    pid: int

    def participant(self, *roles: ParticipantRole) -> ActiveParticipant:
        return ActiveParticipant(
            user_id=self.name,
            user_is_requestor=False,
            alternative_user_id=str(self.pid),
            roles=tuple(role.value for role in roles),
            network_access_point=self.host,
        )


# ParticipantObjectTypeCode (1 person, 2 system object) and TypeCodeRole (PS3.15 / RFC 3881 table).
_SYSTEM_OBJECT = 2
_ROLE_REPORT = 3
_ROLE_RESOURCE = 4
_ROLE_SECURITY_RESOURCE = 13
_ROLE_JOB = 20
_ROLE_JOB_STREAM = 21
_ROLE_QUERY = 24
_STUDY_UID = Code("110180", "DCM", "Study Instance UID")
_HUMAN_LOOP = Code("human-loop", "medgate", "Human loop name")
_FLOW = Code("flow-definition", "medgate", "Flow definition name")
_URI = Code("12", "RFC-3881", "URI")
_MODEL_VERSION = Code("model-version", "medgate", "Model version")
_SEARCH = Code("10", "RFC-3881", "Search Criteria")


@dataclass(frozen=True)
class Study:
    """A study and the SOP instances of it that were touched: ``instances`` are (SOP class UID, SOP instance UID)."""

    study_uid: str
    instances: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check(is_uid(self.study_uid), "StudyInstanceUID")
        for sop_class, sop_instance in self.instances:
            _check(is_uid(sop_class), "SOPClassUID")
            _check(is_uid(sop_instance), "SOPInstanceUID")

    def as_json(self) -> dict[str, Any]:
        by_class: dict[str, list[str]] = {}
        for sop_class, sop_instance in self.instances:
            by_class.setdefault(sop_class, []).append(sop_instance)
        entry = _object(_SYSTEM_OBJECT, _ROLE_REPORT, _STUDY_UID, self.study_uid)
        if by_class:
            entry["ParticipantObjectDescription"] = {
                "SOPClass": [
                    {"UID": uid, "NumberOfInstances": len(uids), "Instance": [{"UID": u} for u in uids]}
                    for uid, uids in by_class.items()
                ]
            }
        return entry


@dataclass(frozen=True)
class HumanLoop:
    """A review case (A2I's human loop) by its name; the flow it belongs to is a separate :class:`Flow`."""

    name: str

    def __post_init__(self) -> None:
        _check(is_name(self.name), "human loop name")

    def as_json(self) -> dict[str, Any]:
        return _object(_SYSTEM_OBJECT, _ROLE_JOB, _HUMAN_LOOP, self.name)


@dataclass(frozen=True)
class Flow:
    """A flow definition (a queue of review cases) by its name."""

    name: str

    def __post_init__(self) -> None:
        _check(is_name(self.name), "flow definition name")

    def as_json(self) -> dict[str, Any]:
        return _object(_SYSTEM_OBJECT, _ROLE_JOB_STREAM, _FLOW, self.name)


@dataclass(frozen=True)
class Query:
    """What a query asked for: the RPC (its filters, when they matter, are :class:`Flow` objects beside it)."""

    rpc: str

    def __post_init__(self) -> None:
        _check(bool(_RPC.match(self.rpc)), "RPC name")

    def as_json(self) -> dict[str, Any]:
        return _object(_SYSTEM_OBJECT, _ROLE_QUERY, _SEARCH, self.rpc)


@dataclass(frozen=True)
class SecurityResource:
    """The function a refused caller tried to use: the RPC, e.g. ``/medgate.v1.Review/DeleteHumanLoop``."""

    rpc: str

    def __post_init__(self) -> None:
        _check(bool(_RPC.match(self.rpc)), "RPC name")

    def as_json(self) -> dict[str, Any]:
        return _object(_SYSTEM_OBJECT, _ROLE_SECURITY_RESOURCE, _URI, self.rpc)


# A model role (settings.models field), a Triton model name, a version number; what happened to the version.
_ROLE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_MODEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
MODEL_COMMANDS = frozenset({"promote", "rollback"})
MODEL_CHANGES = frozenset({"serving", "replaced", "requested"})


@dataclass(frozen=True)
class ModelVersion:
    """A version of a role's Triton model that a ``medgate models`` command switched to (``serving``), away from
    (``replaced``), or was refused (``requested``); no patient data exists in any of its fields."""

    role: str
    model: str
    version: str
    change: str
    command: str

    def __post_init__(self) -> None:
        _check(bool(_ROLE.match(self.role)), "model role")
        _check(bool(_MODEL.match(self.model)), "model name")
        _check(self.version.isdigit() and len(self.version) <= 12, "model version")
        _check(self.change in MODEL_CHANGES, "model version change")
        _check(self.command in MODEL_COMMANDS, "model command")

    def as_json(self) -> dict[str, Any]:
        entry = _object(_SYSTEM_OBJECT, _ROLE_RESOURCE, _MODEL_VERSION, f"{self.model}/{self.version}")
        entry["ParticipantObjectDescription"] = {"Role": self.role, "Change": self.change, "Command": self.command}
        return entry


# An audit day file's name (services/audit/log.py), what a check found in it; an HMAC key's id (chain.py).
_AUDIT_FILE = re.compile(r"^audit-[0-9]{8}\.jsonl$")
AUDIT_FILE_RESULTS = frozenset({"intact", "broken", "missing", "not-verified"})
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
KEY_CHANGES = frozenset({"current", "successor"})
_AUDIT_KEY = Code("audit-hmac-key-id", "medgate", "Audit HMAC key id")


def is_audit_file(name: str) -> bool:
    return bool(_AUDIT_FILE.match(name))


@dataclass(frozen=True)
class AuditFile:
    """An audit day file a check read (Audit Log Used, PS3.15 A.5.3.2: the log by its URI, here its name relative
    to ``security.audit_dir``) and what the check found: ``intact``, ``broken``, ``missing`` (only the syslog mirror
    has its records) or ``not-verified``; ``records`` is how many of its records were verified."""

    name: str
    result: str
    records: int = 0
    mirror: bool = False

    def __post_init__(self) -> None:
        _check(bool(_AUDIT_FILE.match(self.name)), "audit file name")
        _check(self.result in AUDIT_FILE_RESULTS, "audit file result")
        _check(isinstance(self.records, int) and self.records >= 0, "audit file record count")

    def as_json(self) -> dict[str, Any]:
        entry = _object(_SYSTEM_OBJECT, _ROLE_SECURITY_RESOURCE, _URI, self.name)
        entry["ParticipantObjectDescription"] = {"Result": self.result, "Records": self.records, "Mirror": self.mirror}
        return entry


@dataclass(frozen=True)
class AuditKey:
    """An audit HMAC key by its id (never the key): the ``current`` one and the ``successor`` a rotation announces."""

    kid: str
    change: str

    def __post_init__(self) -> None:
        _check(bool(_KEY_ID.match(self.kid)), "audit key id")
        _check(self.change in KEY_CHANGES, "audit key change")

    def as_json(self) -> dict[str, Any]:
        entry = _object(_SYSTEM_OBJECT, _ROLE_SECURITY_RESOURCE, _AUDIT_KEY, self.kid)
        entry["ParticipantObjectDescription"] = {"Change": self.change}
        return entry


ParticipantObject = Study | HumanLoop | Flow | Query | SecurityResource | ModelVersion | AuditFile | AuditKey
_OBJECT_TYPES = (Study, HumanLoop, Flow, Query, SecurityResource, ModelVersion, AuditFile, AuditKey)


def _object(type_code: int, role: int, id_type: Code, object_id: str) -> dict[str, Any]:
    return {
        "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role,
        "ParticipantObjectIDTypeCode": id_type.as_json(),
        "ParticipantObjectID": object_id,
    }


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_ms(moment: datetime) -> str:
    """``2026-11-30T08:15:02.123Z``: UTC to the millisecond, as EventDateTime wants it."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: the enterprise site and the host that saw the event."""

    site: str
    host: str

    def as_json(self) -> dict[str, Any]:
        return {
            "AuditEnterpriseSiteID": self.site,
            "AuditSourceID": self.host,
            "AuditSourceTypeCode": [Code("4", "DCM", "Application Server Process").as_json()],
        }


@dataclass(frozen=True)
class AuditEvent:
    """One audit message. ``status`` is the gRPC code name (``OK``, ``PERMISSION_DENIED``...), never a message.

    ``rpc`` and ``request_id`` tie the event to the access-log line of the same call.
    """

    event_id: EventID
    action: Action
    status: str
    participants: tuple[ActiveParticipant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[EventType, ...] = ()
    time: datetime = field(default_factory=utc_now)
    rpc: str = ""
    request_id: str = ""

    def __post_init__(self) -> None:
        _check(self.status in STATUS_NAMES, "EventOutcomeDescription")
        _check(bool(self.participants), "ActiveParticipant")
        _check(self.time.tzinfo is not None, "EventDateTime")
        _check(not self.rpc or bool(_RPC.match(self.rpc)), "RPC name")
        _check(not self.request_id or bool(_TOKEN.match(self.request_id)), "request id")
        for obj in self.objects:
            _check(isinstance(obj, _OBJECT_TYPES), "ParticipantObject")

    @property
    def outcome(self) -> Outcome:
        return outcome_for(self.status)

    def as_json(self, source: AuditSource) -> dict[str, Any]:
        identification: dict[str, Any] = {
            "EventID": self.event_id.value.as_json(),
            "EventActionCode": self.action.value,
            "EventDateTime": iso_ms(self.time),
            "EventOutcomeIndicator": int(self.outcome),
            "EventOutcomeDescription": self.status,
        }
        if self.event_types:
            identification["EventTypeCode"] = [event_type.value.as_json() for event_type in self.event_types]
        message: dict[str, Any] = {
            "EventIdentification": identification,
            "ActiveParticipant": [participant.as_json() for participant in self.participants],
            "AuditSourceIdentification": source.as_json(),
        }
        if self.objects:
            message["ParticipantObjectIdentification"] = [obj.as_json() for obj in self.objects]
        call = {key: value for key, value in (("rpc", self.rpc), ("request_id", self.request_id)) if value}
        if call:
            message["medgate"] = call
        return message


def application_activity(application: Application, *, start: bool, status: str = "OK") -> AuditEvent:
    """Application Start or Stop (PS3.15 A.5.3.1) of a medgate server process."""
    return AuditEvent(
        event_id=EventID.APPLICATION_ACTIVITY,
        action=Action.EXECUTE,
        status=status,
        event_types=(EventType.APPLICATION_START if start else EventType.APPLICATION_STOP,),
        participants=(application.participant(ParticipantRole.APPLICATION),),
    )


def export_event(
    application: Application, *, os_user: str, flow: str, loops: tuple[str, ...], status: str = "OK"
) -> AuditEvent:
    """Export (PS3.15 A.5.3.6) of a flow's reviewed cases by a local user; malformed names are left out."""
    objects: list[ParticipantObject] = [Flow(flow)] if is_name(flow) else []
    objects.extend(HumanLoop(name) for name in loops if is_name(name))
    return AuditEvent(
        event_id=EventID.EXPORT,
        action=Action.READ,
        status=status,
        participants=(
            requestor(user_id=os_user, extra_roles=(ParticipantRole.SOURCE.value,)),
            application.participant(ParticipantRole.APPLICATION),
        ),
        objects=tuple(objects),
    )


def model_version_event(
    application: Application,
    *,
    os_user: str,
    command: str,
    role: str,
    model: str,
    to_version: str,
    from_version: str,
    status: str = "OK",
) -> AuditEvent:
    """``medgate models promote|rollback`` by a local user: Security Alert / Software Configuration (PS3.15
    A.5.3.11), the version switched to and the one it replaced; refused (``FAILED_PRECONDITION``), the version
    requested and the one that keeps serving. Only roles, model names, versions and the user."""
    ok = status == "OK"
    changes = ((to_version, "serving" if ok else "requested"), (from_version, "replaced" if ok else "serving"))
    objects = [ModelVersion(role, model, version, change, command) for version, change in changes if version]
    return AuditEvent(
        event_id=EventID.SECURITY_ALERT,
        action=Action.EXECUTE,
        status=status,
        event_types=(EventType.SOFTWARE_CONFIGURATION,),
        participants=(
            requestor(user_id=os_user, extra_roles=(ParticipantRole.APPLICATION_LAUNCHER.value,)),
            application.participant(ParticipantRole.APPLICATION),
        ),
        objects=tuple(objects),
    )


def audit_restarted(application: Application) -> AuditEvent:
    """Security Alert / Audit Recording Started, ``DATA_LOSS``: the audit file ended in a torn record (a write cut
    short, e.g. by a crash) and its hash chain starts again after it (services/audit/chain.py)."""
    return AuditEvent(
        event_id=EventID.SECURITY_ALERT,
        action=Action.EXECUTE,
        status="DATA_LOSS",
        event_types=(EventType.AUDIT_RECORDING_STARTED,),
        participants=(application.participant(ParticipantRole.APPLICATION),),
    )


# The most day files one Audit Log Used event names (the ones not intact first): a year of files would make a line
# too long for one syslog datagram; the counts in the event's files are what a reader needs beyond that.
MAX_AUDIT_FILES = 32


def audit_log_used(
    application: Application, *, os_user: str, files: tuple[AuditFile, ...], mirror: bool, status: str = "OK"
) -> AuditEvent:
    """``medgate audit verify``: Audit Log Used (PS3.15 A.5.3.2), read by a local user: ``OK`` (every chain intact
    and, with ``mirror``, every mirrored record in its file), ``DATA_LOSS`` (tampering found) or
    ``FAILED_PRECONDITION`` (could not be checked: no files, keyed without the key). Names the day files and what
    was found in each (``Mirror``: whether it was compared with the syslog mirror too); never a record."""
    ordered = sorted(files, key=lambda f: f.result == "intact")[:MAX_AUDIT_FILES]
    return AuditEvent(
        event_id=EventID.AUDIT_LOG_USED,
        action=Action.READ,
        status=status,
        participants=(
            requestor(user_id=os_user, extra_roles=(ParticipantRole.APPLICATION_LAUNCHER.value,)),
            application.participant(ParticipantRole.APPLICATION),
        ),
        objects=tuple(dataclasses.replace(f, mirror=mirror) for f in ordered),
    )


def audit_key_rotated(application: Application, *, os_user: str, current: str, successor: str) -> AuditEvent:
    """``medgate audit rotate-key``: Security Alert / Security Configuration (PS3.15 A.5.3.11), written under the
    ``current`` key, announcing the ``successor`` key's id; ``medgate audit verify`` accepts the successor's records
    from here on (services/audit/chain.py). Key ids only, never a key."""
    return AuditEvent(
        event_id=EventID.SECURITY_ALERT,
        action=Action.EXECUTE,
        status="OK",
        event_types=(EventType.SECURITY_CONFIGURATION,),
        participants=(
            requestor(user_id=os_user, extra_roles=(ParticipantRole.APPLICATION_LAUNCHER.value,)),
            application.participant(ParticipantRole.APPLICATION),
        ),
        objects=(AuditKey(current, "current"), AuditKey(successor, "successor")),
    )
