"""Routing rules: which received instances are analysed, with which tasks and prompts (pure, no network).

A TOML file of ``[[route]]`` tables, first match wins; an instance no route matches is ignored.
Each condition is optional and lists the values that match (any of them); values are compared as
DICOM code strings (trimmed, upper case), AE titles and tag values as shell patterns (``CT_*``)::

    [[route]]
    name = "chest-radiograph"
    modality = ["CR", "DX"]                    # (0008,0060)
    body_part = ["CHEST"]                      # (0018,0015) BodyPartExamined
    sop_class = ["DigitalXRayImageStorageForPresentation", "1.2.840.10008.5.1.4.1.1.1"]  # keyword or UID
    calling_ae = ["MODALITY_*"]
    called_ae = ["MEDGATE"]
    tags = { Manufacturer = ["ACME*"] }        # any other attribute by keyword
    tasks = ["classify", "detect", "segment"]
    prompts = "left lung & right lung & heart"

Header values are read only to be compared, never logged or quoted in errors.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.uid import UID, UID_dictionary

TASKS = ("classify", "detect", "segment")
_CONDITIONS = ("modality", "body_part", "sop_class", "calling_ae", "called_ae", "tags")
_KEYS = {"name", *_CONDITIONS, "tasks", "prompts", "min_score", "max_detections", "frame"}
# The header attributes a rule can name without `tags`.
HEADER_KEYWORDS = ("Modality", "BodyPartExamined", "SOPClassUID")


class RouteError(ValueError):
    """The routing rules file cannot be used; the message names the rule and the key."""


@dataclass(frozen=True)
class Route:
    """One rule: its conditions (empty = any) and what to run on a matching instance."""

    name: str
    tasks: tuple[str, ...]
    prompts: str = ""
    modality: frozenset[str] = frozenset()
    body_part: frozenset[str] = frozenset()
    sop_class: frozenset[str] = frozenset()
    calling_ae: tuple[str, ...] = ()
    called_ae: tuple[str, ...] = ()
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    min_score: float = 0.0
    max_detections: int = 0
    frame: int | None = None

    def keywords(self) -> set[str]:
        """The header attributes this rule reads."""
        return {*HEADER_KEYWORDS, *self.tags}

    def matches(self, header: Mapping[str, str], *, calling_ae: str, called_ae: str) -> bool:
        """Whether an instance with ``header`` (keyword -> value as text) from ``calling_ae`` matches."""
        if self.modality and _cs(header.get("Modality", "")) not in self.modality:
            return False
        if self.body_part and _cs(header.get("BodyPartExamined", "")) not in self.body_part:
            return False
        if self.sop_class and header.get("SOPClassUID", "").strip() not in self.sop_class:
            return False
        if self.calling_ae and not _any_pattern(calling_ae.strip(), self.calling_ae):
            return False
        if self.called_ae and not _any_pattern(called_ae.strip(), self.called_ae):
            return False
        return all(_any_pattern(header.get(keyword, "").strip(), patterns) for keyword, patterns in self.tags.items())


@dataclass(frozen=True)
class Routes:
    routes: tuple[Route, ...]

    def match(self, header: Mapping[str, str], *, calling_ae: str, called_ae: str) -> Route | None:
        """The first route that matches, or None (the instance is ignored)."""
        for route in self.routes:
            if route.matches(header, calling_ae=calling_ae, called_ae=called_ae):
                return route
        return None

    def keywords(self) -> list[str]:
        """Every header attribute some rule reads (what the node reads from a received header)."""
        return sorted(set().union(*(route.keywords() for route in self.routes)) if self.routes else HEADER_KEYWORDS)


def _cs(value: str) -> str:
    return value.strip().upper()


def _any_pattern(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value.upper(), pattern.upper()) for pattern in patterns)


def _strings(rule: str, key: str, value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise RouteError(f"route {rule}: {key} must be a non-empty string or list of strings")
    return [v.strip() for v in values]


def _sop_class(rule: str, value: str) -> str:
    """A SOP class UID from a UID or a pydicom keyword (``CTImageStorage``)."""
    if value[0].isdigit():
        if not UID(value).is_valid:
            raise RouteError(f"route {rule}: sop_class {value!r} is not a valid UID")
        return value
    for known, entry in UID_dictionary.items():
        if entry[4] == value:
            return str(known)
    raise RouteError(f"route {rule}: sop_class {value!r} is neither a UID nor a SOP class keyword")


def _route(index: int, table: Any) -> Route:
    if not isinstance(table, dict):
        raise RouteError(f"route #{index + 1} must be a table ([[route]])")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RouteError(f"route #{index + 1} needs a name")
    rule = repr(name)
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise RouteError(f"route {rule}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    tasks = _strings(rule, "tasks", table.get("tasks", []) or [""])
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise RouteError(f"route {rule}: unknown task(s) {', '.join(map(repr, bad))} (known: {', '.join(TASKS)})")
    prompts = table.get("prompts", "")
    if not isinstance(prompts, str):
        raise RouteError(f"route {rule}: prompts must be a string ('left lung & heart')")
    if "segment" in tasks and not prompts.strip():
        raise RouteError(f"route {rule}: task segment needs prompts")
    tags: dict[str, tuple[str, ...]] = {}
    raw_tags = table.get("tags", {})
    if not isinstance(raw_tags, dict):
        raise RouteError(f"route {rule}: tags must be a table of keyword = pattern(s)")
    for keyword, patterns in raw_tags.items():
        tag = tag_for_keyword(keyword)
        if tag is None or keyword_for_tag(tag) != keyword:
            raise RouteError(f"route {rule}: tags.{keyword} is not a DICOM attribute keyword")
        tags[keyword] = tuple(_strings(rule, f"tags.{keyword}", patterns))
    min_score = table.get("min_score", 0.0)
    max_detections = table.get("max_detections", 0)
    frame = table.get("frame")
    if not isinstance(min_score, int | float) or isinstance(min_score, bool) or not 0 <= min_score <= 1:
        raise RouteError(f"route {rule}: min_score must be a number from 0 to 1")
    if not isinstance(max_detections, int) or isinstance(max_detections, bool) or max_detections < 0:
        raise RouteError(f"route {rule}: max_detections must be a whole number, 0 or more")
    if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool) or frame < 0):
        raise RouteError(f"route {rule}: frame must be a whole number, 0 or more (0-based)")

    def upper(key: str) -> frozenset[str]:
        return frozenset(_cs(v) for v in _strings(rule, key, table[key])) if key in table else frozenset()

    return Route(
        name=name.strip(),
        tasks=tuple(dict.fromkeys(tasks)),
        prompts=prompts.strip(),
        modality=upper("modality"),
        body_part=upper("body_part"),
        sop_class=frozenset(_sop_class(rule, v) for v in _strings(rule, "sop_class", table["sop_class"]))
        if "sop_class" in table
        else frozenset(),
        calling_ae=tuple(_strings(rule, "calling_ae", table["calling_ae"])) if "calling_ae" in table else (),
        called_ae=tuple(_strings(rule, "called_ae", table["called_ae"])) if "called_ae" in table else (),
        tags=tags,
        min_score=float(min_score),
        max_detections=max_detections,
        frame=frame,
    )


def parse_routes(table: Mapping[str, Any]) -> Routes:
    """Routes from a parsed TOML document (``{"route": [...]}``)."""
    unknown = sorted(set(table) - {"route"})
    if unknown:
        raise RouteError(f"unknown top-level key(s) {', '.join(unknown)}: rules are [[route]] tables")
    raw = table.get("route", [])
    if not isinstance(raw, list):
        raise RouteError("route must be an array of tables ([[route]])")
    routes = tuple(_route(i, item) for i, item in enumerate(raw))
    names = [route.name for route in routes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RouteError(f"route names must be unique: {', '.join(map(repr, duplicates))}")
    return Routes(routes)


def load_routes(path: Path) -> Routes:
    """The rules in ``path``; :class:`RouteError` names what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RouteError(f"routing rules {path} cannot be read: {exc.strerror or exc}") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RouteError(f"routing rules {path} are not valid TOML: {exc}") from None
    try:
        return parse_routes(table)
    except RouteError as exc:
        raise RouteError(f"{path}: {exc}") from None


class RoutesFile:
    """The rules of one file, read again when it changes (an administrator edits them without a restart).

    A file that no longer parses keeps the last good rules (and says so once); at start-up it is an error.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self.routes = load_routes(self.path)
        self.last_error: str = ""

    def _stat(self) -> tuple[int, int]:
        try:
            info = self.path.stat()
        except OSError:
            return (0, 0)
        return (info.st_mtime_ns, info.st_size)

    def current(self) -> Routes:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.routes = load_routes(self.path)
                self.last_error = ""
            except RouteError as exc:
                self.last_error = str(exc)
        return self.routes
