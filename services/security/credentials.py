"""Development credentials for the embedded default: a CA, server and client certificates, a signing key, tokens.

``ensure_dev_credentials`` creates them once in ``security.credentials_dir`` (the folder 0700, every
file 0600) and afterwards keeps what is still valid: a certificate is made again only when it is
missing, unreadable, not signed by the CA, not for the right names or uses, or within 30 days of its
end; a token only when it is missing, no longer verifies, or has lived 90% of its year (re-minted with
the same key, so servers holding the JWKS need nothing new). ``mint_token`` and ``new_signing_key``
are for tests that need a token with other claims or a key the server does not know.

Pure: no gRPC. Nothing here is fit for patient data on a network; a hospital points the settings at
its own CA and identity provider.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.security.identity import Role
from services.settings import SecuritySettings

# File names inside credentials_dir (the default settings point cert_file, key_file, client_ca_file,
# jwks_file and router_token_file at these).
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.pem", "client.key"
SIGNING_KEY, JWKS = "signing.key", "jwks.json"
_LOCK = ".lock"

CLIENT_COMMON_NAME = "medgate-dev-client"
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
ALGORITHM = "ES256"  # P-256 keys for the signing key and every certificate

# One token per role; the subject is who the token says the caller is (the reviewer's id for reviewer).
SUBJECTS: dict[Role, str] = {
    Role.INFERENCE: "dev-inference",
    Role.REVIEWER: "dr-dev",
    Role.ADMIN: "dev-admin",
    Role.ROUTER: "medgate-gateway",
}

_DAY = dt.timedelta(days=1)
CA_LIFETIME = 3650 * _DAY
LEAF_LIFETIME = 825 * _DAY  # the longest leaf lifetime browsers and TLS stacks accept without complaint
TOKEN_LIFETIME = 365 * _DAY
# A certificate this close to its end is made again; a token past this share of its life is re-minted.
RENEW_BEFORE = 30 * _DAY
TOKEN_RENEW_FRACTION = 0.9
# Certificates are back-dated a little so a client whose clock is slightly behind still accepts them.
BACKDATE = dt.timedelta(minutes=5)


def token_file(role: Role | str) -> str:
    return f"{Role(role).value}.token"


def dev_security_files(directory: Path) -> dict[str, Path]:
    """``security`` settings that point every credential file at the development credentials in ``directory``."""
    return {
        "credentials_dir": directory,
        "cert_file": directory / SERVER_CERT,
        "key_file": directory / SERVER_KEY,
        "client_ca_file": directory / CA_CERT,
        "jwks_file": directory / JWKS,
        "router_token_file": directory / token_file(Role.ROUTER),
    }


class _CredentialFile:
    """A :class:`DevCredentials` attribute: the path of one credential file in its directory."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, credentials: DevCredentials, owner: type | None = None) -> Path:
        return credentials.directory / self.name


_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY, SIGNING_KEY, JWKS)


@dataclass(frozen=True)
class DevCredentials:
    """Where the development credentials are, and which files this call wrote (empty when all were kept)."""

    directory: Path
    written: tuple[str, ...] = ()

    ca_cert = _CredentialFile(CA_CERT)
    ca_key = _CredentialFile(CA_KEY)
    server_cert = _CredentialFile(SERVER_CERT)
    server_key = _CredentialFile(SERVER_KEY)
    client_cert = _CredentialFile(CLIENT_CERT)
    client_key = _CredentialFile(CLIENT_KEY)
    signing_key = _CredentialFile(SIGNING_KEY)
    jwks = _CredentialFile(JWKS)

    def token_path(self, role: Role | str) -> Path:
        return self.directory / token_file(role)

    def token(self, role: Role | str) -> str:
        return self.token_path(role).read_text().strip()

    @property
    def files(self) -> list[Path]:
        return [self.directory / name for name in _FILES] + [self.token_path(role) for role in Role]


# --- signing keys and tokens -------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    """An EC private key with its key id (the RFC 7638 thumbprint of the public key unless given)."""

    private_key: ec.EllipticCurvePrivateKey
    kid: str = ""
    algorithm: str = ALGORITHM

    def __post_init__(self) -> None:
        if not self.kid:
            object.__setattr__(self, "kid", jwk_thumbprint(self.public_jwk(with_metadata=False)))

    def public_jwk(self, *, with_metadata: bool = True) -> dict[str, str]:
        """The public key as a JWK; with ``kid``, ``alg`` and ``use: sig`` unless ``with_metadata`` is false."""
        numbers = self.private_key.public_key().public_numbers()
        size = (self.private_key.curve.key_size + 7) // 8
        jwk = {
            "kty": "EC",
            "crv": _CURVES[self.private_key.curve.name],
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
        if with_metadata:
            jwk.update(kid=self.kid, alg=self.algorithm, use="sig")
        return jwk

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_CURVE_FOR_ALGORITHM: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order, base64url."""
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def new_signing_key(algorithm: str = ALGORITHM, *, kid: str = "") -> SigningKey:
    """A fresh EC signing key (P-256 for ES256): "another key" or the next key of a rotation in tests."""
    return SigningKey(ec.generate_private_key(_CURVE_FOR_ALGORITHM[algorithm]), kid=kid, algorithm=algorithm)


def load_signing_key(path: Path) -> SigningKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path} is not a P-256 private key")
    return SigningKey(key)


def jwks_of(*keys: SigningKey) -> dict[str, list[dict[str, str]]]:
    """A JWKS document (``{"keys": [...]}``) with the public half of each key."""
    return {"keys": [key.public_jwk() for key in keys]}


def jwks_json(*keys: SigningKey) -> str:
    return json.dumps(jwks_of(*keys), indent=2) + "\n"


def set_claim(claims: dict[str, Any], dotted: str, value: Any) -> None:
    """``claims`` with ``value`` at a dotted path: ``realm_access.roles`` -> ``{"realm_access": {"roles": ...}}``."""
    *parents, leaf = dotted.split(".")
    node = claims
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ValueError(f"claim {name!r} on the path {dotted!r} is not an object")
        node = child
    node[leaf] = value


def get_claim(claims: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path, or None when any step is missing."""
    node: Any = claims
    for name in dotted.split("."):
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def mint_token(
    key: SigningKey | None,
    *,
    issuer: str | None,
    audience: str | Sequence[str] | None,
    subject: str | None,
    roles: Sequence[str] = (),
    roles_claim: str = "realm_access.roles",
    lifetime: dt.timedelta = TOKEN_LIFETIME,
    now: dt.datetime | None = None,
    not_before: dt.datetime | None = None,
    claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
) -> str:
    """A signed JWT with the usual claims, for the development tokens and for tests.

    ``None`` for ``issuer``, ``audience`` or ``subject`` leaves that claim out; ``claims`` are set last
    (a value of ``None`` removes the claim), ``headers`` likewise over ``{kid}``. A negative
    ``lifetime`` gives an expired token. ``key=None`` with ``algorithm="none"`` gives an unsigned token.
    """
    issued = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    payload: dict[str, Any] = {}
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience if isinstance(audience, str) else list(audience)
    if subject is not None:
        payload["sub"] = subject
        payload["preferred_username"] = subject
    if roles:
        set_claim(payload, roles_claim, list(roles))
    payload["iat"] = int(issued.timestamp())
    payload["nbf"] = int((not_before or issued).timestamp())
    payload["exp"] = int((issued + lifetime).timestamp())
    payload["jti"] = uuid.uuid4().hex
    for name, value in (claims or {}).items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    header: dict[str, Any] = {"kid": key.kid} if key is not None else {}
    for name, value in (headers or {}).items():
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    if key is None:
        return jwt.encode(payload, "", algorithm=algorithm or "none", headers=header or None)
    return jwt.encode(payload, key.private_key, algorithm=algorithm or key.algorithm, headers=header)


def role_token(key: SigningKey, security: SecuritySettings, role: Role, *, now: dt.datetime | None = None) -> str:
    """The development token for ``role``: the settings' issuer and audience, a year long."""
    return mint_token(
        key,
        issuer=security.issuer,
        audience=security.audience,
        subject=SUBJECTS[role],
        roles=[role.value],
        roles_claim=security.roles_claim,
        now=now,
    )


def _token_is_current(text: str, key: SigningKey, security: SecuritySettings, role: Role, now: dt.datetime) -> bool:
    try:
        claims = jwt.decode(
            text,
            key.private_key.public_key(),
            algorithms=[key.algorithm],
            audience=security.audience,
            issuer=security.issuer,
            options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_exp": False, "verify_nbf": False},
        )
        header = jwt.get_unverified_header(text)
    except (jwt.InvalidTokenError, ValueError):
        return False
    roles = get_claim(claims, security.roles_claim)
    if header.get("kid") != key.kid or claims["sub"] != SUBJECTS[role] or roles != [role.value]:
        return False
    issued, expires = float(claims["iat"]), float(claims["exp"])
    return now.timestamp() < issued + TOKEN_RENEW_FRACTION * (expires - issued)


# --- certificates ------------------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medgate development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    until: dt.datetime,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """What every certificate here has: a random serial, back-dated validity, basic constraints and key usage
    (a CA may sign certificates and CRLs and nothing below it; a leaf signs only for itself)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def _make_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = _name("medgate development CA")
    public = key.public_key()
    cert = (
        _builder(name, name, public, now, now + CA_LIFETIME, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usages: Sequence[x509.ObjectIdentifier],
    now: dt.datetime,
    *,
    names: Sequence[str] = (),
    addresses: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    public = key.public_key()
    until = min(now + LEAF_LIFETIME, ca_cert.not_valid_after_utc)
    builder = (
        _builder(_name(common_name), ca_cert.subject, public, now, until, ca=False)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names or addresses:
        general: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        general += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _read_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _read_ec_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _lasts(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now + BACKDATE and cert.not_valid_after_utc - now > RENEW_BEFORE


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _leaf_is_current(
    cert: x509.Certificate | None,
    key: ec.EllipticCurvePrivateKey | None,
    ca: x509.Certificate,
    usages: Sequence[x509.ObjectIdentifier],
    now: dt.datetime,
    *,
    names: Sequence[str] = (),
    addresses: Sequence[str] = (),
) -> bool:
    if cert is None or key is None or not _same_key(cert, key) or not _lasts(cert, now) or not _issued_by(cert, ca):
        return False
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is None or not set(usages) <= set(eku):
        return False
    if names or addresses:
        san = _extension(cert, x509.SubjectAlternativeName)
        if san is None:
            return False
        have_names = set(san.get_values_for_type(x509.DNSName))
        have_addresses = set(san.get_values_for_type(x509.IPAddress))
        if not set(names) <= have_names or not {ipaddress.ip_address(a) for a in addresses} <= have_addresses:
            return False
    return True


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- files -------------------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, 0600 from the first byte, fsynced."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)  # O_CREAT's mode is masked by umask only downward, but an old file keeps its own
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One creator at a time (``make run`` beside ``medgate credentials``, or test workers)."""
    descriptor = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@dataclass
class _Writer:
    directory: Path
    written: list[str] = field(default_factory=list)

    def write(self, name: str, data: bytes) -> None:
        _write_private(self.directory / name, data)
        self.written.append(name)


def ensure_dev_credentials(
    security: SecuritySettings, *, force: bool = False, now: dt.datetime | None = None
) -> DevCredentials:
    """Create the development credentials in ``security.credentials_dir`` once; keep what is still valid.

    ``force`` makes everything anew (new CA, keys and tokens: clients holding the old CA or tokens
    must take the new ones). ``now`` is for tests of renewal.
    """
    moment = now or dt.datetime.now(dt.UTC)
    directory = Path(security.credentials_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    out = _Writer(directory)
    with _locked(directory):
        # The CA: everything else hangs on it, so a new CA means new certificates.
        ca_cert = None if force else _read_cert(directory / CA_CERT)
        ca_key = None if force else _read_ec_key(directory / CA_KEY)
        if ca_cert is None or ca_key is None or not _same_key(ca_cert, ca_key) or not _lasts(ca_cert, moment):
            ca_cert, ca_key = _make_ca(moment)
            out.write(CA_KEY, _key_pem(ca_key))
            out.write(CA_CERT, _pem(ca_cert))
        # The server's certificate is also the gateway's client certificate when it routes to a review service
        # that requires one (ATNA node authentication), hence clientAuth beside serverAuth.
        server_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        leaves = [
            (SERVER_CERT, SERVER_KEY, "localhost", server_usages, SERVER_NAMES, SERVER_ADDRESSES),
            # RFC 5280 verifiers (cryptography's among them) want a subjectAltName on client certificates too.
            (CLIENT_CERT, CLIENT_KEY, CLIENT_COMMON_NAME, [ExtendedKeyUsageOID.CLIENT_AUTH], (CLIENT_COMMON_NAME,), ()),
        ]
        for cert_name, key_name, common_name, usages, names, addresses in leaves:
            cert = _read_cert(directory / cert_name)
            key = _read_ec_key(directory / key_name)
            if force or not _leaf_is_current(cert, key, ca_cert, usages, moment, names=names, addresses=addresses):
                cert, key = _make_leaf(ca_cert, ca_key, common_name, usages, moment, names=names, addresses=addresses)
                out.write(key_name, _key_pem(key))
                out.write(cert_name, _pem(cert))
        # The signing key and its JWKS; tokens signed by another key are minted again below.
        signing: SigningKey | None = None
        if not force and (directory / SIGNING_KEY).exists():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signing = load_signing_key(directory / SIGNING_KEY)
        if signing is None:
            signing = new_signing_key()
            out.write(SIGNING_KEY, signing.private_pem())
        document = jwks_json(signing).encode()
        try:
            current_jwks = (directory / JWKS).read_bytes()
        except OSError:
            current_jwks = b""
        if current_jwks != document:
            out.write(JWKS, document)
        for role in Role:
            name = token_file(role)
            try:
                text = (directory / name).read_text().strip()
            except OSError:
                text = ""
            if force or not _token_is_current(text, signing, security, role, moment):
                out.write(name, (role_token(signing, security, role, now=moment) + "\n").encode())
        # Files made by hand or by an older version keep no wider mode than the rest.
        for path in DevCredentials(directory).files:
            if path.stat().st_mode & 0o777 != 0o600:
                os.chmod(path, 0o600)
    return DevCredentials(directory, tuple(out.written))


def dev_credentials_needed(security: SecuritySettings) -> bool:
    """Whether ``medgate serve`` should create the development credentials before it starts.

    Only when TLS or tokens are on, and a file the servers read lives in ``credentials_dir`` and is
    missing: files configured elsewhere (a hospital's CA and keys) are never created or replaced.
    """
    if not (security.tls or security.auth):
        return False
    used: list[Path] = []
    if security.tls:
        used += [security.cert_file, security.key_file]
        if security.require_client_cert:
            used.append(security.client_ca_file)
    if security.auth:
        if not security.oidc_issuer:
            used.append(security.jwks_file)
        used.append(security.router_token_file)
    directory = Path(security.credentials_dir).resolve()
    ours = [path for path in used if Path(path).resolve().parent == directory]
    return any(not path.exists() for path in ours)
