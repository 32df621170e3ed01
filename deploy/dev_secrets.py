"""Development TLS material and tokens for deploy/compose.yaml, in deploy/secrets/ (made once, never committed).

    .venv/bin/python deploy/dev_secrets.py            # then: docker-compose -f deploy/compose.yaml up

The development CA, signing key (JWKS) and one token per role are `medgate credentials`' own, in
deploy/secrets/dev/ (clients on this machine use them: --ca deploy/secrets/dev/ca.pem --token-file
deploy/secrets/dev/inference.token). Beside them, the files the containers mount as secrets: a node
certificate that also names the compose services (gateway, review), the CA, the JWKS, the gateway's router
token and PostgreSQL's password. A hospital replaces all of it with its PKI's certificates and its identity
provider (README, "From one machine to a cluster").

The mounted files are mode 0644 in a 0700 folder: compose bind-mounts them as they are, and the containers'
users (medgate 10001, postgres 999) must read them; the folder keeps other users of this machine out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.security import credentials as dev
from services.security.identity import Role
from services.settings import load_settings

HERE = Path(__file__).resolve().parent
# The names the node certificate must carry: how clients on this machine (localhost) and the containers
# (compose service names) reach the gateway and the review service.
NODE_NAMES = ("localhost", "gateway", "review")
NODE_ADDRESSES = ("127.0.0.1", "::1")
# The files compose.yaml mounts (secret name -> file in deploy/secrets/).
MOUNTED = ("ca.pem", "node.pem", "node.key", "jwks.json", "router.token", "postgres_password")


def make(directory: Path, *, force: bool = False) -> list[Path]:
    """Write what compose.yaml mounts into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    security = load_settings(security={"credentials_dir": directory / "dev"}).security
    made = dev.ensure_dev_credentials(security, force=force)
    written: list[Path] = []

    def put(name: str, data: bytes) -> None:
        path = directory / name
        path.write_bytes(data)
        os.chmod(path, 0o644)
        written.append(path)

    ca_cert = dev._read_cert(made.ca_cert)
    ca_key = dev._read_ec_key(made.ca_key)
    if ca_cert is None or ca_key is None:
        raise SystemExit(f"error: the development CA in {made.directory} cannot be read")
    node = directory / "node.pem"
    if force or made.written or not node.exists():
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # also the gateway's client cert
        now = dt.datetime.now(dt.UTC)
        cert, key = dev._make_leaf(
            ca_cert, ca_key, "medgate-node", usages, now, names=NODE_NAMES, addresses=NODE_ADDRESSES
        )
        put(
            "node.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        put("node.pem", cert.public_bytes(serialization.Encoding.PEM))
    put("ca.pem", made.ca_cert.read_bytes())
    put("jwks.json", made.jwks.read_bytes())
    shutil.copyfile(made.token_path(Role.ROUTER), directory / "router.token")
    os.chmod(directory / "router.token", 0o644)
    written.append(directory / "router.token")
    password = directory / "postgres_password"
    if force or not password.exists():
        put("postgres_password", secrets.token_urlsafe(24).encode())
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=HERE / "secrets", help="where to write (default deploy/secrets)")
    parser.add_argument("--force", action="store_true", help="make everything anew (new CA, keys, tokens, password)")
    args = parser.parse_args(argv)
    make(args.dir, force=args.force)
    print(f"compose secrets in {args.dir}: {', '.join(MOUNTED)}")
    client = args.dir / "dev"
    print(f"clients on this machine: --ca {client / 'ca.pem'} --token-file {client / 'inference.token'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
