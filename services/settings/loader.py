"""Reading the settings strictly: TOML values and ``MEDGATE_*`` variables as the type of each default, every
unknown name and refused value collected into one :class:`SettingsError`, secrets never quoted."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.settings.sections import Settings

ENV_PREFIX = "MEDGATE_"


class SettingsError(ValueError):
    """Unknown setting names or values a setting cannot take; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# MEDGATE_* environment variables that are not settings. Every other MEDGATE_* variable must name a
# setting, so a typo stops start-up instead of leaving a limit at its default.
NOT_SETTINGS: dict[str, str] = {
    f"{ENV_PREFIX}CONFIG": "the TOML settings file, read by load_settings",
    f"{ENV_PREFIX}BENCH_VERBOSE": "bench/bench_gateway.py: the gateways' logs on the bench's stderr",
    f"{ENV_PREFIX}TOKEN": "clients/connect.py: the bearer token a client sends (a credential, not a setting)",
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# A refused value is never quoted when the setting's name suggests a secret, and cut short otherwise.
_SECRET_WORDS = ("token", "key", "password", "passwd", "secret", "credential")
_QUOTE_MAX_CHARS = 40
_MESSAGE_MAX_CHARS = 300


def quoted(value: object, name: str = "") -> str:
    """``value`` as an error message may show it: cut to a few dozen characters, hidden for secrets."""
    if any(word in name.lower() for word in _SECRET_WORDS):
        return "(value not shown: the name suggests a secret)"
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= _QUOTE_MAX_CHARS:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:_QUOTE_MAX_CHARS]!r}... ({len(text)} characters)"


class _Refused(ValueError):
    """One value a setting cannot take; the message says what it must be."""


def _kind(like: Any) -> str:
    if isinstance(like, bool):
        return "true or false"
    if isinstance(like, int):
        return "an integer"
    if isinstance(like, float):
        return "a number"
    if isinstance(like, Path):
        return "a path"
    return "a string"


def _from_env(text: str, like: Any) -> Any:
    """An environment variable's text as the type of the field's default, strictly."""
    try:
        if isinstance(like, bool):
            word = text.strip().lower()
            if word in _TRUE | _FALSE:
                return word in _TRUE
            raise _Refused("must be true or false (1/0, true/false, yes/no, on/off)")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            number = float(text)
            if not math.isfinite(number):
                raise _Refused("must be a finite number")
            return number
    except _Refused:
        raise
    except ValueError:
        raise _Refused(f"must be {_kind(like)}") from None
    if isinstance(like, Path):
        if not text.strip():
            raise _Refused("must be a path, not empty")
        return Path(text)
    return text


def _from_toml(value: Any, like: Any) -> Any:
    """A TOML value checked against the type of the field's default (an int is accepted for a float)."""
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(like, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif isinstance(like, Path):
        ok = isinstance(value, str) and bool(value.strip())
        value = Path(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise _Refused(f"must be {_kind(like)}, not {_toml_type(value)}")
    return value


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def _suggestion(name: str, known: list[str]) -> str:
    """`` (did you mean X?)`` for the closest known name, or nothing when none is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _setting_paths(section: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every setting under ``section`` as a path of field names, nested sections walked."""
    paths: list[tuple[str, ...]] = []
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            paths.extend(_setting_paths(value, (*path, item.name)))
        else:
            paths.append((*path, item.name))
    return paths


def _env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


class Loader:
    """One pass over the defaults with a TOML table and the environment, collecting every problem."""

    def __init__(self, defaults: Settings, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self.dotted = [".".join(path) for path in _setting_paths(defaults)]

    def apply(self, section: Any, path: tuple[str, ...], table: dict[str, Any]) -> Any:
        """``section`` with fields replaced from ``table`` and then the environment; problems noted, not raised."""
        names = [item.name for item in dataclasses.fields(section)]
        for key in table:
            if key not in names:
                self.problems.append(self._unknown_key(path, key, table[key], names))
        changes: dict[str, Any] = {}
        for name in names:
            current = getattr(section, name)
            dotted = ".".join((*path, name))
            if dataclasses.is_dataclass(current):
                inner = table.get(name, {})
                if not isinstance(inner, dict):
                    self.problems.append(
                        f"{dotted} in {self.source} must be a table ([{dotted}]), not {_toml_type(inner)}"
                    )
                    inner = {}
                changes[name] = self.apply(current, (*path, name), inner)
                continue
            if name in table:
                try:
                    changes[name] = _from_toml(table[name], current)
                except _Refused as exc:
                    self.problems.append(f"{dotted} in {self.source} {exc}")
            env_name = _env_name((*path, name))
            text = os.environ.get(env_name)
            if text is not None:
                try:
                    changes[name] = _from_env(text, current)
                except _Refused as exc:
                    self.problems.append(f"{env_name} {exc}, not {quoted(text, env_name)}")
        try:
            return dataclasses.replace(section, **changes)
        except ValueError as exc:  # the section's own check (__post_init__), e.g. a limit that must be positive
            message = " ".join(str(exc).split())
            cut = message[:_MESSAGE_MAX_CHARS] + ("..." if len(message) > _MESSAGE_MAX_CHARS else "")
            where = ".".join(path)
            self.problems.append(cut if cut.startswith(where) else f"[{where}] {cut}")
            return section

    def _unknown_key(self, path: tuple[str, ...], key: str, value: Any, names: list[str]) -> str:
        if not path and isinstance(value, dict):
            return f"unknown section [{key}] in {self.source}" + _suggestion(f"[{key}]", [f"[{n}]" for n in names])
        dotted = ".".join((*path, key))
        elsewhere = [d for d in self.dotted if d.rsplit(".", 1)[-1] == key]  # e.g. store_path under [gateway]
        if elsewhere:
            choices = ", ".join(elsewhere[:-1]) + " or " + elsewhere[-1] if len(elsewhere) > 1 else elsewhere[0]
            hint = f" (did you mean {choices}?)"
        else:
            hint = _suggestion(dotted, [".".join((*path, n)) for n in names])
        return f"unknown setting {dotted} in {self.source}{hint}"

    def unknown_environment(self) -> None:
        """Note every MEDGATE_* variable that is neither a setting nor in NOT_SETTINGS."""
        known = {_env_name(tuple(dotted.split("."))) for dotted in self.dotted}
        suffixes = sorted(name.removeprefix(ENV_PREFIX) for name in known)
        for name in sorted(os.environ):
            if name.startswith(ENV_PREFIX) and name not in known and name not in NOT_SETTINGS:
                close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
                hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
                self.problems.append(f"unknown setting {name}{hint}")


def read_table(config_path: Path, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(config_path.read_text())
    except OSError as exc:
        raise SettingsError([f"{source} cannot be read: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError([f"{source} is not valid TOML: {exc}"]) from None
