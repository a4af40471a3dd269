"""Persistent, append-only, hash-chained record of privacy mechanisms.

A ledger records *mechanisms* (noise multiplier, sampling rate, steps, ...),
never epsilons: epsilon is always recomputed from the entries by
:mod:`shared.privacy.accounting`.  The same class is used on each device
(level "record": DP-SGD over the device's own interactions) and by the server
(level "user": DP-FedAvg over clients).  The two levels protect different units
and are kept in separate files; one ledger never mixes levels or neighbouring
relations.

File format: JSON Lines, one entry per line, each line the canonical JSON
(:func:`canonical_json`) of the entry including its ``hash``.  ``hash`` is the
SHA-256 of the canonical JSON of the entry without ``hash`` (see
:func:`entry_hash`), and ``prev_hash`` is the previous entry's hash ("" for
the first), so editing, deleting, reordering or appending lines is detected on
load.  A hash chain alone detects accidental or naive edits; an attacker who can
rewrite the whole file can rebuild it.  So a ledger opened with a signing key
(``signer``, see :mod:`shared.privacy.signing`) also signs each entry's hash
(``signature``, which the hash excludes; the hash covers ``prev_hash``, so each
signature covers the chain up to its entry), and after every append rewrites a
signed *head* beside the ledger (``<name>.head.json``: entry count and last
hash).  Deleting the last entries then fails too: the head names more entries
than remain.  :func:`verify_file` checks all of it with only the public key.

The file is only ever opened for appending: each append writes one line,
flushes and fsyncs, under an exclusive ``flock``, and refuses to write if the
file changed since it was loaded.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import numbers
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .accounting import EpsilonReport, SampledGaussian, epsilon_after, epsilon_checked
from .signing import fingerprint, public_hex, sign, verify

__all__ = [
    "LEVELS",
    "LedgerEntry",
    "LedgerError",
    "BudgetExceeded",
    "PrivacyLedger",
    "canonical_json",
    "entry_hash",
    "head_body",
    "head_path",
    "read_head",
]

LEVELS = ("record", "user")
HASH_EXCLUDED_FIELDS = ("hash", "signature")


def canonical_json(obj: Any) -> str:
    """The one canonical serialisation used for hashing and signing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of `entry` without the excluded fields."""
    payload = {k: v for k, v in entry.items() if k not in HASH_EXCLUDED_FIELDS}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


class LedgerError(RuntimeError):
    """The ledger file is corrupt, inconsistent, or an entry is invalid."""


def head_path(ledger_path: Path) -> Path:
    """Where the signed head of a ledger lives: `privacy-ledger.jsonl` -> `privacy-ledger.head.json`."""
    return ledger_path.with_name(ledger_path.stem + ".head.json")


HEAD_FIELDS = ("entries", "last_hash", "ledger", "level", "public_key", "signature")


def head_body(ledger: str, level: str, entries: int, last_hash: str, public_key: str) -> dict[str, Any]:
    """What a ledger's head signature covers (everything in the head but the signature)."""
    return {"ledger": ledger, "level": level, "entries": entries, "last_hash": last_hash, "public_key": public_key}


def read_head(ledger_path: Path, public_key: str) -> dict[str, Any] | None:
    """The ledger's signed head, its signature checked against `public_key`; None if there is none."""
    path = head_path(ledger_path)
    if not path.exists():
        return None
    try:
        head = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(head, dict) or set(head) != set(HEAD_FIELDS):
        raise LedgerError(f"{path}: expected the fields {HEAD_FIELDS}")
    body = {k: v for k, v in head.items() if k != "signature"}
    if head["public_key"] != public_key:
        raise LedgerError(f"{path}: signed by key {fingerprint(head['public_key'])}, expected {fingerprint(public_key)}")
    if not isinstance(head["signature"], str) or not verify(public_key, head["signature"], canonical_json(body)):
        raise LedgerError(f"{path}: invalid signature (head edited)")
    if not isinstance(head["entries"], int) or head["entries"] < 0 or not isinstance(head["last_hash"], str):
        raise LedgerError(f"{path}: entries must be an integer >= 0 and last_hash a string")
    return head


class BudgetExceeded(RuntimeError):
    """The next mechanism would take epsilon above the budget."""

    def __init__(self, *, budget: float, epsilon: float, delta: float, unit: str, path: Path | None = None):
        self.budget = budget
        self.epsilon = epsilon
        self.delta = delta
        self.unit = unit
        self.path = path
        where = f" (ledger {path})" if path is not None else ""
        super().__init__(
            f"privacy budget exceeded{where}: the next step would reach epsilon={epsilon:.4f} "
            f"at delta={delta:g}, above the budget epsilon={budget:g}; unit: {unit}"
        )


@dataclass(frozen=True)
class LedgerEntry:
    level: str  # "record" or "user"
    round: int
    mechanism: str  # e.g. "dp-sgd", "gaussian", "dp-fedavg"
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    sampling: str  # "poisson", "none", "uniform-without-replacement", ...
    amplification: bool  # sample_rate claimed for amplification (False => accounted with q = 1)
    neighbouring: str  # e.g. "add/remove one interaction"
    details: dict = field(default_factory=dict)
    timestamp: float = 0.0
    prev_hash: str = ""
    hash: str = ""
    signature: str = ""  # Ed25519 over `hash` by the ledger's key ("" in an unsigned ledger)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def event(self) -> SampledGaussian:
        """The accounted mechanism: sample_rate only counts if amplification is claimed."""
        q = self.sample_rate if self.amplification else 1.0
        return SampledGaussian(self.noise_multiplier, q, self.steps)


FIELDS = tuple(f.name for f in dataclasses.fields(LedgerEntry))
_CHAIN_FIELDS = ("prev_hash", "hash", "signature")
_USER_FIELDS = tuple(f for f in FIELDS if f not in _CHAIN_FIELDS)
_REQUIRED_USER_FIELDS = tuple(f for f in _USER_FIELDS if f not in ("level", "details", "timestamp"))


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_poisson(sampling: Any) -> bool:
    return isinstance(sampling, str) and (sampling == "poisson" or sampling.startswith("poisson-"))


def _validate(d: dict[str, Any]) -> list[str]:
    """Problems with an entry's fields (empty list if valid)."""
    bad: list[str] = []
    if d.get("level") not in LEVELS:
        bad.append(f"level must be one of {LEVELS}, got {d.get('level')!r}")
    if not _is_int(d.get("round")) or d["round"] < 0:
        bad.append(f"round must be an integer >= 0, got {d.get('round')!r}")
    for name in ("mechanism", "sampling", "neighbouring"):
        if not isinstance(d.get(name), str) or not d[name].strip():
            bad.append(f"{name} must be a non-empty string, got {d.get(name)!r}")
    nm = d.get("noise_multiplier")
    if not _is_real(nm) or not math.isfinite(nm) or nm < 0:
        bad.append(f"noise_multiplier must be a finite number >= 0, got {nm!r}")
    q = d.get("sample_rate")
    if not _is_real(q) or not (0.0 < q <= 1.0):
        bad.append(f"sample_rate must be in (0, 1], got {q!r}")
    if not _is_int(d.get("steps")) or d["steps"] < 0:
        bad.append(f"steps must be an integer >= 0, got {d.get('steps')!r}")
    c = d.get("clip_norm")
    if not _is_real(c) or not math.isfinite(c) or c <= 0:
        bad.append(f"clip_norm must be a finite number > 0, got {c!r}")
    if not isinstance(d.get("amplification"), bool):
        bad.append(f"amplification must be a bool, got {d.get('amplification')!r}")
    elif d["amplification"] and not _is_poisson(d.get("sampling")):
        # the accountants analyse Poisson subsampling only; claiming its
        # amplification for another sampler is a claim the training does not earn
        bad.append(
            "amplification=True requires Poisson sampling (sampling='poisson' or 'poisson-<variant>', "
            f"e.g. 'poisson-csprng'), got sampling={d.get('sampling')!r}"
        )
    if not isinstance(d.get("details"), dict):
        bad.append(f"details must be a dict, got {type(d.get('details')).__name__}")
    ts = d.get("timestamp")
    if not _is_real(ts) or not math.isfinite(ts):
        bad.append(f"timestamp must be a finite number, got {ts!r}")
    for name in _CHAIN_FIELDS:
        if name in d and not isinstance(d[name], str):
            bad.append(f"{name} must be a string")
    return bad


class PrivacyLedger:
    """Append-only JSON Lines ledger of mechanisms at one level ("record" or "user")."""

    def __init__(self, path: Path | str, level: str, signer: Ed25519PrivateKey | None = None,
                 public_key: str | None = None):
        """`signer`: the owner's key; entries are signed and the head kept. `public_key` (hex): check
        every signature and the head against it without being able to write (an auditor)."""
        if level not in LEVELS:
            raise LedgerError(f"level must be one of {LEVELS}, got {level!r}")
        self.path = Path(path)
        self.level = level
        self.signer = signer
        self.public_key = public_hex(signer.public_key()) if signer is not None else public_key
        if signer is not None and public_key is not None and public_key != self.public_key:
            raise LedgerError(f"{self.path}: the signing key does not match the public key {public_key}")
        self.entries: list[LedgerEntry] = []
        self._size = 0  # bytes of the file as loaded / last written by us
        self._load()
        if self.public_key is not None:
            self._check_signatures()

    @property
    def head_path(self) -> Path:
        return head_path(self.path)

    # ------------------------------------------------------------------ loading

    def _fail(self, lineno: int | None, msg: str) -> LedgerError:
        where = f"{self.path}, line {lineno}" if lineno is not None else f"{self.path}"
        return LedgerError(f"{where}: {msg}")

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        self._size = len(data)
        if not data:
            return
        lines = data.split(b"\n")
        if lines[-1] != b"":
            raise self._fail(len(lines), "incomplete last line (no trailing newline): truncated write or appended data")
        prev = ""
        for lineno, raw in enumerate(lines[:-1], start=1):
            entry = self._verify_line(lineno, raw, prev)
            self.entries.append(entry)
            prev = entry.hash

    def _verify_line(self, lineno: int, raw: bytes, prev_hash: str) -> LedgerEntry:
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(lineno, f"not valid JSON ({exc})") from None
        if not isinstance(d, dict):
            raise self._fail(lineno, "not a JSON object")
        keys = set(d)
        if keys != set(FIELDS):
            missing = sorted(set(FIELDS) - keys)
            extra = sorted(keys - set(FIELDS))
            raise self._fail(lineno, f"wrong fields (missing {missing}, unexpected {extra})")
        bad = _validate(d)
        if bad:
            raise self._fail(lineno, "invalid entry: " + "; ".join(bad))
        if d["level"] != self.level:
            raise self._fail(lineno, f"entry has level {d['level']!r} but this ledger is level {self.level!r}")
        if d["prev_hash"] != prev_hash:
            raise self._fail(
                lineno,
                f"broken hash chain: prev_hash {d['prev_hash']!r} does not match the previous entry's hash "
                f"{prev_hash!r} (line deleted, reordered or inserted)",
            )
        if entry_hash(d) != d["hash"]:
            raise self._fail(lineno, f"hash mismatch: entry content was modified (stored {d['hash']!r})")
        if raw.decode("utf-8") != canonical_json(d):
            raise self._fail(lineno, "line is not in canonical JSON form (file edited)")
        if self.entries and d["neighbouring"] != self.entries[0].neighbouring:
            raise self._fail(lineno, f"neighbouring {d['neighbouring']!r} differs from the ledger's "
                                     f"{self.entries[0].neighbouring!r}")
        return LedgerEntry(**d)

    # ---------------------------------------------------------------- appending

    def append(self, **fields: Any) -> LedgerEntry:
        """Validate, chain (and sign) and durably append one entry; returns it."""
        if self.public_key is not None and self.signer is None:
            raise LedgerError(f"{self.path}: opened to verify (public key only); appending needs the signing key")
        unknown = sorted(set(fields) - set(_USER_FIELDS))
        if unknown:
            raise LedgerError(f"{self.path}: unknown or computed fields {unknown} (prev_hash/hash are computed)")
        missing = [f for f in _REQUIRED_USER_FIELDS if f not in fields]
        if missing:
            raise LedgerError(f"{self.path}: missing fields {missing}")
        d: dict[str, Any] = dict(fields)
        d.setdefault("level", self.level)
        d.setdefault("details", {})
        d.setdefault("timestamp", time.time())
        bad = _validate(d)
        if bad:
            raise LedgerError(f"{self.path}: invalid entry: " + "; ".join(bad))
        if d["level"] != self.level:
            raise LedgerError(f"{self.path}: entry level {d['level']!r} but this ledger is level {self.level!r}")
        if self.entries:
            # Rounds are ordered within a run (details.run); a later run, on a device that persists, counts afresh.
            run = d["details"].get("run", "")
            last = next((e for e in reversed(self.entries) if e.details.get("run", "") == run), None)
            if last is not None and d["round"] < last.round:
                raise LedgerError(f"{self.path}: round {d['round']} is before the last recorded round {last.round}"
                                  + (f" of run {run}" if run else ""))
            if d["neighbouring"] != self.entries[0].neighbouring:
                raise LedgerError(
                    f"{self.path}: neighbouring {d['neighbouring']!r} differs from the ledger's "
                    f"{self.entries[0].neighbouring!r}; never mix units in one ledger"
                )
        # normalise types so that the in-memory entry equals the reloaded one
        d["round"] = int(d["round"])
        d["steps"] = int(d["steps"])
        for name in ("noise_multiplier", "sample_rate", "clip_norm", "timestamp"):
            d[name] = float(d[name])
        try:
            d["details"] = json.loads(canonical_json(d["details"]))
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"{self.path}: details are not JSON-serialisable: {exc}") from None
        d["prev_hash"] = self.entries[-1].hash if self.entries else ""
        d["hash"] = entry_hash(d)
        d["signature"] = sign(self.signer, d["hash"]) if self.signer is not None else ""
        line = (canonical_json(d) + "\n").encode("utf-8")

        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size != self._size:
                raise LedgerError(
                    f"{self.path}: file changed since it was loaded ({self._size} -> {size} bytes); "
                    "reload before appending"
                )
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._size += len(line)
        entry = LedgerEntry(**d)
        self.entries.append(entry)
        if self.signer is not None:
            self._write_head()
        return entry

    # ---------------------------------------------------------------- signing

    def _check_signatures(self) -> None:
        for lineno, entry in enumerate(self.entries, start=1):
            if not entry.signature:
                raise self._fail(lineno, "entry is not signed, but this ledger is signed")
            if not verify(self.public_key, entry.signature, entry.hash):
                raise self._fail(lineno, f"invalid signature for key {fingerprint(self.public_key)} "
                                         "(entry rewritten, or signed by another key)")
        head = read_head(self.path, self.public_key)
        if head is None:
            if self.entries:
                raise self._fail(None, f"signed head {self.head_path.name} is missing")
            return
        n, last = head["entries"], head["last_hash"]
        if head["level"] != self.level or head["ledger"] != self.path.name:
            raise self._fail(None, f"head belongs to ledger {head['ledger']!r} level {head['level']!r}")
        if n > len(self.entries) or (n and self.entries[n - 1].hash != last):
            raise self._fail(
                None, f"truncated or rolled back: its signed head records {n} entries ending in {last[:16]}..., "
                      f"the file holds {len(self.entries)}"
            )
        if n < len(self.entries):
            if self.signer is None:
                raise self._fail(None, f"the signed head records {n} entries, the file holds {len(self.entries)} "
                                       "(entries appended after the head was last signed)")
            self._write_head()  # a crash between the two writes: the owner re-signs its own signed entries

    def _write_head(self) -> None:
        body = head_body(self.path.name, self.level, len(self.entries), self.entries[-1].hash if self.entries else "",
                         self.public_key)
        text = canonical_json({**body, "signature": sign(self.signer, canonical_json(body))}) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.head_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def head(self) -> dict[str, Any]:
        """The signed head as stored (entry count, last hash, key, signature)."""
        return json.loads(self.head_path.read_text())

    # --------------------------------------------------------------- accounting

    def events(self) -> list[SampledGaussian]:
        """Accounted mechanisms; entries without amplification count with sample_rate 1.0."""
        return [e.event() for e in self.entries]

    def epsilon(self, delta: float) -> EpsilonReport:
        return epsilon_checked(self.events(), delta)

    @property
    def unit(self) -> str:
        if self.entries:
            return f"{self.level}-level DP, neighbouring: {self.entries[0].neighbouring}"
        return f"{self.level}-level DP"

    def check_budget(self, new_event: SampledGaussian, delta: float, budget: float) -> float:
        """Epsilon (PLD) after `new_event`; raises BudgetExceeded if it would exceed `budget`.

        `new_event` is accounted as given: pass sample_rate=1.0 unless the step will
        claim Poisson amplification (as ``LedgerEntry.event()`` does).
        """
        eps = epsilon_after(self.events(), new_event, delta)
        if eps > budget:
            raise BudgetExceeded(budget=budget, epsilon=eps, delta=delta, unit=self.unit, path=self.path)
        return eps

    def rounds(self) -> list[int]:
        """Distinct rounds with at least one entry, ascending."""
        return sorted({e.round for e in self.entries})

    def __len__(self) -> int:
        return len(self.entries)
