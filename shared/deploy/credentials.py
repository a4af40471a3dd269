"""Credentials of a secured federation, made with `cryptography`.

- A certificate authority (CA) and a SuperLink certificate signed by it: the SuperLink serves TLS with
  them, and every SuperNode and `flwr` CLI verifies the SuperLink against the CA certificate. The
  certificate names every DNS name and IP address devices use to reach the SuperLink (gRPC checks the
  subject alternative names; 127.0.0.1 must be listed as an IP address, not as a name).
- A device key pair for SuperNode authentication: EC P-384 in OpenSSH format, the format Flower's
  `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read.

Private keys are created with owner-only permissions (0600) from the first byte and are never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.config import ConfigError

DEFAULT_NAMES = ("localhost", "127.0.0.1")


class CredentialError(ConfigError):
    """A credential file cannot be written or read; the message names the file."""


def write_private(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write secret bytes to a file only its owner can read (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CredentialError(f"{path} exists; refusing to overwrite a private key (pass --force to replace it)") from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an existing file keeps its mode under O_TRUNC: reset it
        handle.write(data)


def _write_public(path: Path, data: bytes, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CredentialError(f"{path} exists; refusing to overwrite it (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path  # give this to every SuperNode and `flwr` CLI (public)
    ca_key: Path  # keep offline: signs SuperLink certificates
    server_cert: Path
    server_key: Path
    names: tuple[str, ...]


def make_certificates(
    out: str | Path,
    names: Sequence[str] = DEFAULT_NAMES,
    days: int = 365,
    overwrite: bool = False,
) -> Certificates:
    """A CA and a SuperLink certificate for `names` (DNS names or IP addresses) in `out`:
    ca.crt, ca.key, superlink.crt, superlink.key. localhost and 127.0.0.1 are always included."""
    out = Path(out)
    names = tuple(dict.fromkeys([*names, *DEFAULT_NAMES]))
    now = dt.datetime.now(dt.timezone.utc)
    # P-384, as for node keys; gRPC (BoringSSL) accepts ECDSA server certificates.
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "avrec federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = Certificates(out / "ca.crt", out / "ca.key", out / "superlink.crt", out / "superlink.key", names)
    pem = serialization.Encoding.PEM
    key_format = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                      encryption_algorithm=serialization.NoEncryption())
    write_private(paths.ca_key, ca_key.private_bytes(**key_format), overwrite)
    write_private(paths.server_key, server_key.private_bytes(**key_format), overwrite)
    _write_public(paths.ca_cert, ca_cert.public_bytes(pem), overwrite)
    _write_public(paths.server_cert, server_cert.public_bytes(pem), overwrite)
    return paths


@dataclass(frozen=True)
class NodeKey:
    private: Path  # stays on the device
    public: Path  # registered with the SuperLink: `flwr supernode register PUBLIC FEDERATION`


def make_node_key(path: str | Path, comment: str = "", overwrite: bool = False) -> NodeKey:
    """An EC P-384 key pair in OpenSSH format: `path` (private, 0600) and `path`.pub."""
    private = Path(path)
    public = private.with_name(private.name + ".pub")
    key = ec.generate_private_key(ec.SECP384R1())
    if public.exists() and not overwrite:
        raise CredentialError(f"{public} exists; refusing to overwrite it (pass --force to replace it)")
    write_private(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                          serialization.NoEncryption()),
        overwrite,
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(public, line + (f" {comment}".encode() if comment else b"") + b"\n", overwrite)
    return NodeKey(private, public)


def check_private_key_file(path: str | Path, what: str) -> Path:
    """The path of an existing private key that only its owner can read; CredentialError otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CredentialError(f"{what} = {str(path)!r}: no such file")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CredentialError(
            f"{what} = {str(path)!r} is readable by others (mode {mode:o}); run `chmod 600 {path}`"
        )
    return path
