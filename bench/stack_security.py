"""Benchmarks serve as ``make run`` does, TLS and tokens, on throwaway development credentials (never var/'s).

``server_env`` gives a server process its ``MEDGATE_SECURITY_*`` settings (secure, or plaintext without
tokens for the arm that measures what security costs); ``client`` the matching client side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients.connect import ClientSecurity
from services.security.credentials import DevCredentials, dev_security_files, ensure_dev_credentials
from services.security.identity import Role
from services.settings import load_settings


def make_credentials(directory: Path) -> DevCredentials:
    """Development credentials in ``directory`` (the settings' issuer and audience, one token per role)."""
    return ensure_dev_credentials(
        load_settings(security={"tls": True, "auth": True, **dev_security_files(directory)}).security
    )


def security_values(credentials: DevCredentials, *, secure: bool, audit_dir: Path) -> dict[str, Any]:
    """``security={...}`` for load_settings: TLS and tokens from ``credentials``, or neither."""
    if not secure:
        return {"tls": False, "auth": False, "audit_dir": audit_dir}
    return {"tls": True, "auth": True, "audit_dir": audit_dir, **dev_security_files(credentials.directory)}


def server_env(credentials: DevCredentials, *, secure: bool, audit_dir: Path) -> dict[str, str]:
    """The same as ``MEDGATE_SECURITY_*`` variables, for a server process."""
    values = security_values(credentials, secure=secure, audit_dir=audit_dir)
    return {
        f"MEDGATE_SECURITY_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in values.items()
    }


def client(credentials: DevCredentials, role: Role | None, *, secure: bool) -> ClientSecurity:
    """The client side: the CA and ``role``'s token (None: TLS without a token), or plaintext."""
    if not secure:
        return ClientSecurity(insecure=True)
    return ClientSecurity(ca_file=credentials.ca_cert, token=credentials.token(role) if role else "")
