"""Ed25519 signing keys for privacy ledgers: the server signs its ledger, each device signs its own.

A key lives in a directory as `signing-key.pem` (PKCS#8, unencrypted, created with mode 0600 and refused
if group or others can read it) beside `signing-key.pub` (the raw 32-byte public key, hex). Signatures are
hex strings over UTF-8 text (an entry hash, or the canonical JSON of a head record).

Whoever holds a private key can sign anything in its name: a signature shows that a record was written
with that key and not edited since, not that the key's holder told the truth. An auditor must get the
public keys through a channel they trust (`avrec audit verify --server-key`), not only from the run
directory that the signatures are meant to protect.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_NAME = "signing-key.pem"
PUBLIC_NAME = "signing-key.pub"


class SigningKeyError(RuntimeError):
    """A signing key is missing, unreadable, or stored with permissions that expose it."""


def load_or_create_key(directory: str | Path) -> Ed25519PrivateKey:
    """The signing key kept in `directory`, generated on first use with owner-only permissions."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PRIVATE_NAME
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            # O_EXCL: two processes racing to create the key cannot both win; 0o600 from the first byte
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_key(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        (directory / PUBLIC_NAME).write_text(public_hex(key.public_key()) + "\n")
        return key
    return load_key(path)


def load_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningKeyError(
            f"{path}: signing key has permissions {mode:04o}; it must be readable by its owner only "
            f"(chmod 600 {path})"
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def read_public(directory: str | Path) -> str:
    """The hex public key recorded beside a signing key."""
    path = Path(directory) / PUBLIC_NAME
    if not path.exists():
        raise SigningKeyError(f"{path}: public key missing")
    return path.read_text().strip()


def fingerprint(public_key_hex: str) -> str:
    """A short name for a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, text: str) -> str:
    return key.sign(text.encode("utf-8")).hex()


def verify(public_key_hex: str, signature_hex: str, text: str) -> bool:
    """True if `signature_hex` is a valid signature of `text` by the key."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        public.verify(bytes.fromhex(signature_hex), text.encode("utf-8"))
    except (InvalidSignature, ValueError):
        return False
    return True
