"""Keeping header values out of logs and warnings while a decode runs.

pydicom's validation warnings and debug log records quote element values (a birth date, a name);
GDCM's C++ trace can print data set content to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

__all__ = ["quiet"]

_QUIET_STATE = threading.local()
_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_catcher: warnings.catch_warnings[None] | None = None
_QUIET_LOGGER_PREFIXES = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "gdcm", "SimpleITK")


class _DropWhileDecoding(logging.Filter):
    """Drops records emitted by the decoding thread; a thread-local flag keeps other threads' logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET_STATE, "active", False)


def _install_log_filter() -> None:
    """Logger filters only see records logged on that very logger, so each known logger gets one."""
    names = set(_QUIET_LOGGER_PREFIXES) | {
        "pydicom.pixels.decoders.base",
        "pydicom.pixels.encoders.base",
        "pydicom.pixels.utils",
        "pylibjpeg.utils",
        "pylibjpeg.tools.jpegio",
    }
    names |= {name for name in list(logging.Logger.manager.loggerDict) if name.split(".")[0] in _QUIET_LOGGER_PREFIXES}
    for name in sorted(names):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropWhileDecoding) for existing in logger.filters):
            logger.addFilter(_DropWhileDecoding())


_install_log_filter()

with contextlib.suppress(Exception):  # GDCM's C++ trace can print dataset content to stderr.
    import gdcm

    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    gdcm.Trace.DebugOff()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings process-wide and pydicom's logs in this thread while any decode runs.

    ``warnings.catch_warnings`` swaps global state and is not thread-safe on its own; a counter
    under a lock enters it for the first concurrent decode and leaves it after the last one.
    """
    global _quiet_depth, _quiet_catcher
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _install_log_filter()  # cheap; covers loggers that libraries created lazily since
            catcher = warnings.catch_warnings()
            catcher.__enter__()
            warnings.simplefilter("ignore")
            _quiet_catcher = catcher
        _quiet_depth += 1
    previous = getattr(_QUIET_STATE, "active", False)
    _QUIET_STATE.active = True
    try:
        yield
    finally:
        _QUIET_STATE.active = previous
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_catcher is not None:
                _quiet_catcher.__exit__(None, None, None)
                _quiet_catcher = None
