"""The run's signed audit manifest, and digests of the configuration and the code.

The server writes `audit-manifest.json` into the run directory when the run ends and signs it with its
ledger key. It names the server's public key, its ledger's signed head, the last signed head each device
reported for its own ledger (so a device ledger rolled back together with its head, or deleted, no longer
matches), how many rounds each client was chosen for, and the SHA-256 of the configuration and of the
code that ran.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .ledger import canonical_json
from .signing import public_hex, sign, verify

MANIFEST_NAME = "audit-manifest.json"
CODE_PACKAGES = ("client", "server", "shared")  # the code the ServerApp and ClientApp run
REPO_ROOT = Path(__file__).resolve().parents[2]


class ManifestError(RuntimeError):
    """The manifest is missing, malformed or its signature does not verify."""


def code_files(root: Path = REPO_ROOT) -> list[Path]:
    """The files the code digest covers, sorted by path relative to `root`: the `.py` files of the app's
    packages, without __pycache__, hidden directories and test modules (`test_*.py`, `*_test.py`, which
    Flower leaves out of the app it installs). Nothing else: not pyproject.toml, which Flower rewrites when
    it builds the app, nor any file Flower adds (`.info/`), nor the checkout's other files. So the copy
    Flower installs and the checkout it came from give the same digest."""
    files = []
    for pkg in CODE_PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).parts
            if any(p == "__pycache__" or p.startswith(".") for p in parts):
                continue
            if path.name.startswith("test_") or path.name.endswith("_test.py") or not path.is_file():
                continue
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def code_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 over the relative path and content of every file of `code_files(root)`, independent of where
    the packages are installed."""
    digest = hashlib.sha256()
    for path in code_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def config_digest(flat: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a flat run configuration."""
    return hashlib.sha256(canonical_json(flat).encode()).hexdigest()


def write_manifest(run_dir: Path, key: Ed25519PrivateKey, body: dict[str, Any]) -> Path:
    body = {**body, "public_key": public_hex(key.public_key())}
    path = Path(run_dir) / MANIFEST_NAME
    path.write_text(json.dumps({**body, "signature": sign(key, canonical_json(body))}, indent=1, sort_keys=True))
    return path


def read_manifest(run_dir: Path, public_key: str) -> dict[str, Any]:
    """The manifest, its signature checked against the server's `public_key`."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"{path}: missing (the server writes it when a run ends)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    signature = data.pop("signature", "")
    if data.get("public_key") != public_key:
        raise ManifestError(f"{path}: names public key {data.get('public_key')!r}, expected the server's {public_key}")
    if not verify(public_key, signature, canonical_json(data)):
        raise ManifestError(f"{path}: invalid signature (manifest edited)")
    return data
