"""The signed heads of the devices' record-level ledgers: how a device reports them with each reply, how the
server reads them for its audit manifest, and how an auditor checks one.

A head is the entry count and last hash of one ledger, signed with that ledger's device key
(`shared.privacy.ledger` keeps it beside the ledger). A device reports one per user it holds every round it
answers, on either path, as the same flat fields `ledger-head.<i>.<field>`: in the record `ledger-heads` of a
plain reply, and in the metrics of a SecAgg+ round's (legacy) FitRes, which carry only scalars. The server
keeps the latest head per device key and signs them all into `audit-manifest.json`; `avrec audit verify`
checks each against the device's signature and the ledger collected from the device. A head depends only on
the device's participation (ledger entries record configured values only), so it adds nothing to what the
server learns.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .ledger import canonical_json, head_body
from .signing import verify

DEVICE_LEDGER = "privacy-ledger.jsonl"  # each user's record-level ledger, in its own state directory
HEADS_RECORD = "ledger-heads"  # the plain reply's record holding the fields
PREFIX = "ledger-head."
WIRE = {"public-key": "public_key", "entries": "entries", "last-hash": "last_hash", "signature": "signature"}


class HeadError(ValueError):
    """A reported head is incomplete, mistyped, or not signed by its device key."""


def head_fields(heads: Iterable[Mapping[str, Any]]) -> dict[str, str | int]:
    """Flat fields for ledger heads as the ledger stores them (`PrivacyLedger.head()`)."""
    return {f"{PREFIX}{i}.{wire}": head[name] for i, head in enumerate(heads) for wire, name in WIRE.items()}


def signed_by_device(public_key: str, head: Mapping[str, Any]) -> bool:
    """Whether `head` ({entries, last_hash, signature}) is the signed head of that key's record-level ledger."""
    body = head_body(DEVICE_LEDGER, "record", head.get("entries"), head.get("last_hash"), public_key)
    return isinstance(head.get("signature"), str) and verify(public_key, head["signature"], canonical_json(body))


def split_heads(fields: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The heads among `fields`, by device public key, as the manifest records them ({entries, last_hash,
    signature}), and the other fields. Raises HeadError, naming the field, for a head that is incomplete,
    mistyped or not signed by its key."""
    grouped: dict[str, dict[str, Any]] = {}
    rest = {}
    for name, value in fields.items():
        if not name.startswith(PREFIX):
            rest[name] = value
            continue
        index, _, wire = name.removeprefix(PREFIX).partition(".")
        if wire not in WIRE:
            raise HeadError(f"reported field {name!r}: expected {PREFIX}<i>.<{'|'.join(WIRE)}>")
        grouped.setdefault(index, {})[WIRE[wire]] = value
    heads = {}
    for index, head in sorted(grouped.items()):
        missing = sorted(set(WIRE.values()) - set(head))
        key, entries = head.get("public_key"), head.get("entries")
        if missing:
            raise HeadError(f"reported ledger head {index} lacks {', '.join(missing)}")
        if not isinstance(key, str) or not isinstance(entries, int) or isinstance(entries, bool) or entries < 1:
            raise HeadError(f"reported ledger head {index}: public-key {key!r} and entries {entries!r}, expected a hex "
                            "key and a count >= 1")
        body = {k: head[k] for k in ("entries", "last_hash", "signature")}
        if not signed_by_device(key, body):
            raise HeadError(f"reported ledger head {index} ({entries} entries) is not signed by its key {key[:16]}...: "
                            "the device's ledger head was altered or forged")
        heads[key] = body
    return heads, rest
