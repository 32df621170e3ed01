"""The development credentials: files and modes, a chain that verifies, tokens the JWKS verifies, idempotence."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import ClientVerifier, PolicyBuilder, ServerVerifier, Store, VerificationError

from services.security.credentials import (
    SUBJECTS,
    DevCredentials,
    dev_credentials_needed,
    dev_security_files,
    ensure_dev_credentials,
    get_claim,
    jwks_of,
    load_signing_key,
    mint_token,
    new_signing_key,
)
from services.security.identity import Role
from services.settings import SecuritySettings

EXPECTED_FILES = {
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
    "signing.key",
    "jwks.json",
    "inference.token",
    "reviewer.token",
    "admin.token",
    "router.token",
}


def settings_in(directory: Path, **changes: object) -> SecuritySettings:
    return SecuritySettings(**{**dev_security_files(directory), **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[SecuritySettings, DevCredentials]:
    security = settings_in(tmp_path_factory.mktemp("credentials") / "var" / "credentials")
    return security, ensure_dev_credentials(security)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verifier_time(certificate: x509.Certificate) -> dt.datetime:
    return certificate.not_valid_before_utc + dt.timedelta(hours=1)


def decode(token: str, jwks: dict[str, object], security: SecuritySettings) -> dict[str, object]:
    """What a server does: the key by the token's kid from the JWKS, the settings' algorithms, iss and aud."""
    keys = jwt.PyJWKSet.from_dict(jwks)
    key = next(k for k in keys.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
    return jwt.decode(
        token,
        key.key,
        algorithms=security.algorithm_list,
        audience=security.audience,
        issuer=security.issuer,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub"]},
    )


def test_every_file_is_made_private_in_a_private_folder(made: tuple[SecuritySettings, DevCredentials]) -> None:
    security, creds = made
    assert creds.directory == security.credentials_dir
    assert stat.S_IMODE(creds.directory.stat().st_mode) == 0o700
    names = {path.name for path in creds.directory.iterdir() if not path.name.startswith(".")}
    assert names == EXPECTED_FILES
    for path in creds.directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert set(creds.written) == EXPECTED_FILES


def test_server_certificate_chains_to_the_ca_for_every_loopback_name(
    made: tuple[SecuritySettings, DevCredentials],
) -> None:
    _, creds = made
    ca, server = cert(creds.ca_cert), cert(creds.server_cert)
    store = Store([ca])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier: ServerVerifier = PolicyBuilder().store(store).time(verifier_time(server)).build_server_verifier(name)
        chain = verifier.verify(server, [])
        assert chain[-1] == ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    wrong = PolicyBuilder().store(store).time(verifier_time(server)).build_server_verifier(x509.DNSName("example.org"))
    with pytest.raises(VerificationError):
        wrong.verify(server, [])


def test_client_certificate_chains_to_the_ca_for_client_auth(made: tuple[SecuritySettings, DevCredentials]) -> None:
    _, creds = made
    ca, client = cert(creds.ca_cert), cert(creds.client_cert)
    verifier: ClientVerifier = PolicyBuilder().store(Store([ca])).time(verifier_time(client)).build_client_verifier()
    verified = verifier.verify(client, [])
    assert verified.chain[-1] == ca
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "medgate-dev-client"
    usages = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_certificate_from_another_ca_does_not_verify(
    tmp_path: Path, made: tuple[SecuritySettings, DevCredentials]
) -> None:
    _, creds = made
    other = ensure_dev_credentials(settings_in(tmp_path / "other"))
    server = cert(other.server_cert)
    verifier = (
        PolicyBuilder()
        .store(Store([cert(creds.ca_cert)]))
        .time(verifier_time(server))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(server, [])


def test_the_jwks_verifies_each_role_token(made: tuple[SecuritySettings, DevCredentials]) -> None:
    security, creds = made
    jwks = json.loads(creds.jwks.read_text())
    (jwk,) = jwks["keys"]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256" and jwk["use"] == "sig"
    assert jwk["kid"] and "d" not in jwk
    for role in Role:
        token = creds.token(role)
        assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": jwk["kid"], "typ": "JWT"}
        claims = decode(token, jwks, security)
        assert claims["sub"] == SUBJECTS[role] == claims["preferred_username"]
        assert get_claim(claims, "realm_access.roles") == [role.value]
        assert claims["exp"] - claims["iat"] == 365 * 86400  # type: ignore[operator]
        assert claims["nbf"] == claims["iat"] and claims["jti"]
    assert SUBJECTS[Role.REVIEWER] == "dr-dev" and SUBJECTS[Role.ROUTER] == "medgate-gateway"


def test_tokens_carry_the_configured_issuer_audience_and_roles_claim(tmp_path: Path) -> None:
    security = settings_in(
        tmp_path / "creds",
        issuer="https://idp.example/realms/x",
        audience="pacs",
        roles_claim="resource_access.medgate.roles",
    )
    creds = ensure_dev_credentials(security)
    claims = decode(creds.token(Role.ADMIN), json.loads(creds.jwks.read_text()), security)
    assert claims["iss"] == "https://idp.example/realms/x" and claims["aud"] == "pacs"
    assert claims["resource_access"] == {"medgate": {"roles": ["admin"]}}
    # The settings move on: the tokens no longer fit them and are minted again, with the same key.
    changed = settings_in(tmp_path / "creds", audience="other")
    again = ensure_dev_credentials(changed)
    assert set(again.written) == {f"{role.value}.token" for role in Role}
    assert decode(again.token(Role.ADMIN), json.loads(again.jwks.read_text()), changed)["aud"] == "other"


def test_a_second_call_keeps_everything(made: tuple[SecuritySettings, DevCredentials]) -> None:
    security, creds = made
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in creds.files}
    again = ensure_dev_credentials(security)
    assert again.written == ()
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in again.files} == before


def test_tokens_past_ninety_percent_of_their_life_are_minted_again_with_the_same_key(tmp_path: Path) -> None:
    security = settings_in(tmp_path / "creds")
    creds = ensure_dev_credentials(security)
    jwks, old = creds.jwks.read_bytes(), creds.token(Role.INFERENCE)
    issued = dt.datetime.fromtimestamp(jwt.decode(old, options={"verify_signature": False})["iat"], dt.UTC)
    assert ensure_dev_credentials(security, now=issued + dt.timedelta(days=300)).written == ()
    renewed = ensure_dev_credentials(security, now=issued + dt.timedelta(days=330))
    assert set(renewed.written) == {f"{role.value}.token" for role in Role}
    assert renewed.jwks.read_bytes() == jwks
    assert renewed.token(Role.INFERENCE) != old
    new_iat = jwt.decode(renewed.token(Role.INFERENCE), options={"verify_signature": False})["iat"]
    assert new_iat == int((issued + dt.timedelta(days=330)).timestamp())


def test_damaged_or_foreign_material_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    security = settings_in(tmp_path / "creds")
    creds = ensure_dev_credentials(security)
    ca, signing = creds.ca_cert.read_bytes(), creds.signing_key.read_bytes()
    creds.server_cert.write_text("not a certificate")
    creds.token_path(Role.REVIEWER).unlink()
    creds.client_key.chmod(0o644)
    again = ensure_dev_credentials(security)
    assert set(again.written) == {"server.pem", "server.key", "reviewer.token"}
    assert again.ca_cert.read_bytes() == ca and again.signing_key.read_bytes() == signing
    assert stat.S_IMODE(again.client_key.stat().st_mode) == 0o600
    # A server certificate from another CA is not ours to keep either.
    other = ensure_dev_credentials(settings_in(tmp_path / "other"))
    creds.server_cert.write_bytes(other.server_cert.read_bytes())
    creds.server_key.write_bytes(other.server_key.read_bytes())
    assert set(ensure_dev_credentials(security).written) == {"server.pem", "server.key"}


def test_force_makes_everything_anew(tmp_path: Path) -> None:
    security = settings_in(tmp_path / "creds")
    first = ensure_dev_credentials(security)
    ca, jwks = first.ca_cert.read_bytes(), first.jwks.read_bytes()
    again = ensure_dev_credentials(security, force=True)
    assert set(again.written) == EXPECTED_FILES
    assert again.ca_cert.read_bytes() != ca and again.jwks.read_bytes() != jwks


def test_mint_token_for_the_failure_cases_a_server_must_refuse(made: tuple[SecuritySettings, DevCredentials]) -> None:
    security, creds = made
    jwks = json.loads(creds.jwks.read_text())
    key = load_signing_key(creds.signing_key)
    common = {"issuer": security.issuer, "audience": security.audience, "subject": "dr-x", "roles": ["reviewer"]}
    assert decode(mint_token(key, **common), jwks, security)["sub"] == "dr-x"  # type: ignore[arg-type]
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(mint_token(key, **common, lifetime=dt.timedelta(seconds=-60)), jwks, security)  # type: ignore[arg-type]
    with pytest.raises(jwt.InvalidAudienceError):
        decode(mint_token(key, **{**common, "audience": "other"}), jwks, security)  # type: ignore[arg-type]
    with pytest.raises(jwt.InvalidIssuerError):
        decode(mint_token(key, **{**common, "issuer": "https://evil"}), jwks, security)  # type: ignore[arg-type]
    with pytest.raises(jwt.MissingRequiredClaimError):
        decode(mint_token(key, **{**common, "subject": None}), jwks, security)  # type: ignore[arg-type]
    with pytest.raises(jwt.ImmatureSignatureError):
        future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        decode(mint_token(key, **common, not_before=future), jwks, security)  # type: ignore[arg-type]
    # Another key under the same kid: the signature does not verify.
    forged = mint_token(new_signing_key(kid=key.kid), **common)  # type: ignore[arg-type]
    with pytest.raises(jwt.InvalidSignatureError):
        decode(forged, jwks, security)
    unsigned = mint_token(None, **common, headers={"kid": key.kid})  # type: ignore[arg-type]
    assert jwt.get_unverified_header(unsigned)["alg"] == "none"
    with pytest.raises(jwt.InvalidAlgorithmError):
        decode(unsigned, jwks, security)
    extra = mint_token(key, **common, claims={"realm_access": {"roles": ["admin"]}, "jti": None})  # type: ignore[arg-type]
    claims = decode(extra, jwks, security)
    assert claims["realm_access"] == {"roles": ["admin"]} and "jti" not in claims


def test_a_rotated_key_set_verifies_tokens_of_both_keys(made: tuple[SecuritySettings, DevCredentials]) -> None:
    security, creds = made
    old, new = load_signing_key(creds.signing_key), new_signing_key()
    assert old.kid != new.kid
    both = jwks_of(old, new)
    common = {"issuer": security.issuer, "audience": security.audience, "subject": "s", "roles": ["admin"]}
    for key in (old, new):
        assert decode(mint_token(key, **common), both, security)["sub"] == "s"  # type: ignore[arg-type]


def test_serve_creates_only_missing_files_that_live_in_the_credentials_dir(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    security = settings_in(directory)
    assert dev_credentials_needed(security)
    ensure_dev_credentials(security)
    assert not dev_credentials_needed(security)
    # A hospital's files elsewhere: never ours to make, even when missing.
    hospital = tmp_path / "hospital"
    elsewhere = settings_in(
        tmp_path / "empty",
        cert_file=hospital / "server.pem",
        key_file=hospital / "server.key",
        oidc_issuer="https://idp.example",
        router_token_file=hospital / "router.token",
    )
    assert not dev_credentials_needed(elsewhere)
    assert not dev_credentials_needed(settings_in(tmp_path / "off", tls=False, auth=False))
