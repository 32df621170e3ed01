"""One settings object for every limit, port and path; read from the environment and an optional TOML file.

``sections``: what the settings are (one frozen dataclass per section, each checking its values); ``loader``:
how they are read (TOML and ``MEDGATE_*`` variables, strictly). :func:`load_settings` joins the two.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from services.imaging.limits import IngestLimits
from services.report.limits import ReportLimits
from services.settings.loader import ENV_PREFIX, NOT_SETTINGS, Loader, SettingsError, read_table
from services.settings.sections import (
    MIB,
    PROJECT_ROOT,
    DicomSettings,
    GatewaySettings,
    ModelNames,
    ReportSettings,
    ReviewSettings,
    SecuritySettings,
    Settings,
    TritonSettings,
    VersionSettings,
)


def load_settings(path: Path | None = None, **section_overrides: Any) -> Settings:
    """Defaults, then the TOML file (``MEDGATE_CONFIG`` or ``path``), then ``MEDGATE_<SECTION>_<FIELD>``.

    Example: ``MEDGATE_TRITON_GRPC_PORT=9001`` or ``[triton] grpc_port = 9001`` in the file. Unknown
    sections, keys and ``MEDGATE_*`` variables (other than :data:`NOT_SETTINGS`) and values a setting
    cannot take raise one :class:`SettingsError` naming each, with the nearest valid name.
    """
    config_env = f"{ENV_PREFIX}CONFIG"
    table: dict[str, Any] = {}
    source = "the settings file"
    if path is None and config_env in os.environ:
        if not os.environ[config_env].strip():
            raise SettingsError([f"{config_env} is set but empty (unset it, or name a TOML file)"])
        path = Path(os.environ[config_env])
        source = f"{path} ({config_env})"
    elif path is not None:
        source = str(path)
    if path is not None:
        table = read_table(path, source)
    defaults = Settings()
    loader = Loader(defaults, source)
    settings = loader.apply(defaults, (), table)
    loader.unknown_environment()
    if loader.problems:
        raise SettingsError(loader.problems)
    if section_overrides:
        settings = dataclasses.replace(
            settings,
            **{
                name: dataclasses.replace(getattr(settings, name), **values)
                for name, values in section_overrides.items()
            },
        )
    return settings


__all__ = [
    "ENV_PREFIX",
    "MIB",
    "NOT_SETTINGS",
    "PROJECT_ROOT",
    "DicomSettings",
    "GatewaySettings",
    "IngestLimits",
    "ModelNames",
    "ReportLimits",
    "ReportSettings",
    "ReviewSettings",
    "SecuritySettings",
    "Settings",
    "SettingsError",
    "TritonSettings",
    "VersionSettings",
    "load_settings",
]
