"""`avrec audit verify RUN_DIR`: check every ledger, signature and head, and recompute every epsilon.

What it checks, each failure naming the file and (where there is one) the entry:
- the server's ledger and each device's ledger: canonical JSON lines, hash chain, an Ed25519 signature on
  every entry by that ledger's key, and the signed head (entry count and last hash), so that an edit, a
  reordering, an insertion or a truncation fails;
- the audit manifest the server signed at the end of the run: the server ledger's head, and the last head
  each device reported, so that a device ledger rolled back together with its head, or deleted, fails;
- the mechanisms against the run's configuration (noise multipliers, clip norms), the amplification rule
  (claimed only for Poisson sampling from the OS CSPRNG) and the cap on rounds per client;
- every epsilon, recomputed from the recorded mechanisms with the checked accountant (PLD, cross-checked
  with Opacus PRV and RDP), against the numbers the run stored in summary.json, rounds.jsonl and
  federated.json.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accounting import AccountingError, epsilon_checked
from .ledger import LedgerError, PrivacyLedger
from .manifest import ManifestError, read_manifest
from .participation import participation, schedule_problems, user_epsilon
from .signing import PUBLIC_NAME, PRIVATE_NAME, SigningKeyError, read_public

SERVER_LEDGER = "server-ledger.jsonl"
DEVICE_LEDGER = "privacy-ledger.jsonl"
CSPRNG_SAMPLING = "poisson-csprng"


@dataclass
class Verification:
    run_dir: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    server_key: str = ""
    server_entries: list = field(default_factory=list)
    devices: dict[str, list] = field(default_factory=dict)  # device directory name -> ledger entries
    device_keys: dict[str, str] = field(default_factory=dict)
    record_epsilons: dict[str, float] = field(default_factory=dict)
    user: Any = None  # EpsilonReport of the most-charged client
    manifest: dict[str, Any] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)  # ledgers that failed to load: no epsilon compared

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, where: Path | str, message: str) -> None:
        where = Path(where)
        try:
            where = where.relative_to(self.run_dir)
        except ValueError:
            pass
        self.problems.append(f"{where}: {message}")


def record_stats(values: list[float]) -> dict[str, float]:
    """Median, 95th percentile (the value at index floor(0.95 n)) and maximum over devices."""
    values = sorted(values)
    return {"median": statistics.median(values), "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
            "max": values[-1]}


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))


def _load_json(v: Verification, name: str) -> dict[str, Any] | None:
    path = v.run_dir / name
    if not path.exists():
        v.fail(path, "missing")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        v.fail(path, f"not valid JSON ({exc})")
        return None


def _check_entries(v: Verification, path: Path, entries: list, level: str) -> None:
    cfg = v.config
    sigma, clip = (cfg.get("noise-multiplier"), cfg.get("clip-norm")) if level == "record" else (
        cfg.get("user-noise-multiplier"), cfg.get("user-clip-norm"))
    for i, e in enumerate(entries, start=1):
        if e.amplification and (e.sampling != CSPRNG_SAMPLING or "CSPRNG" not in str(e.details.get("sampling_source", ""))):
            v.fail(path, f"entry {i}: claims amplification by sampling, but its sampling is {e.sampling!r} from "
                         f"{e.details.get('sampling_source', 'an unstated source')!r}; only Poisson sampling from the "
                         "OS CSPRNG earns it")
        if e.mechanism in ("dp-sgd", "dp-fedavg"):
            if sigma is not None and e.noise_multiplier != sigma:
                v.fail(path, f"entry {i}: noise multiplier {e.noise_multiplier}, the run's configuration says {sigma}")
            if clip is not None and e.clip_norm != clip:
                v.fail(path, f"entry {i}: clip norm {e.clip_norm}, the run's configuration says {clip}")


def _server(v: Verification) -> None:
    path = v.run_dir / SERVER_LEDGER
    user_dp = v.config.get("dp") in ("user", "both")
    if not path.exists():
        if user_dp:
            v.fail(path, "missing, but the run ran user-level DP (dp = %s)" % v.config.get("dp"))
        return
    try:
        ledger = PrivacyLedger(path, "user", public_key=v.server_key)
    except LedgerError as exc:
        v.fail(path, str(exc).replace(str(path), "").lstrip(", :"))
        v.invalid.add(SERVER_LEDGER)  # its epsilon cannot be recomputed
        return
    v.server_entries = ledger.entries
    _check_entries(v, path, ledger.entries, "user")
    rounds = [e.round for e in ledger.entries]
    if len(set(rounds)) != len(rounds):
        v.fail(path, f"more than one DP-FedAvg entry for a round: rounds {rounds}")
    head = v.manifest.get("server_ledger")
    if v.manifest and (head is None or head["entries"] != len(ledger.entries)
                       or head["last_hash"] != (ledger.entries[-1].hash if ledger.entries else "")):
        v.fail(path, f"does not match the server ledger head in the signed manifest ({head}): "
                     f"the file holds {len(ledger.entries)} entries")
    if not any(e.amplification for e in ledger.entries):
        cap, sep = v.config.get("max-rounds-per-client", 0), v.config.get("min-round-separation", 1)
        for problem in schedule_problems(ledger.entries, cap, sep):
            v.fail(path, problem)
    if v.manifest and dict(participation(ledger.entries)) != v.manifest.get("participation"):
        v.fail(path, "per-client participation counts differ from those in the signed manifest")


def _devices(v: Verification) -> None:
    root = v.run_dir / "devices"
    if not root.exists():
        root = Path(v.config.get("state-dir") or root)
    reported = dict(v.manifest.get("device_heads", {}))
    for ledger_path in sorted(root.glob(f"*/{DEVICE_LEDGER}")):
        name = ledger_path.parent.name
        try:
            key = read_public(ledger_path.parent)
            reported_head = reported.pop(key, None)
            ledger = PrivacyLedger(ledger_path, "record", public_key=key)
        except (LedgerError, SigningKeyError) as exc:
            v.fail(ledger_path, str(exc).replace(str(ledger_path), "").lstrip(", :"))
            v.invalid.add(name)
            continue
        v.devices[name], v.device_keys[name] = ledger.entries, key
        _check_entries(v, ledger_path, ledger.entries, "record")
        head = reported_head
        if v.manifest and ledger.entries:
            if head is None:
                v.fail(ledger_path, "its key is not among the device heads the server recorded in the signed manifest")
            elif head["entries"] != len(ledger.entries) or head["last_hash"] != ledger.entries[-1].hash:
                v.fail(ledger_path, f"the device last reported {head['entries']} entries ending in "
                                    f"{head['last_hash'][:16]}...; the file holds {len(ledger.entries)} entries "
                                    "(rolled back or replaced after the run)")
    for key, head in reported.items():
        v.fail(root, f"the signed manifest names a device ledger ({head['entries']} entries, key {key[:16]}...) "
                     "that is not in the run directory (deleted)")


def _epsilons(v: Verification, summary: dict | None, rounds: list[dict], federated: dict | None) -> None:
    privacy = (summary or {}).get("privacy", {})
    if v.devices:
        delta = v.config["delta"]
        cache: dict[tuple, float] = {}
        for name, entries in v.devices.items():
            events = tuple(e.event() for e in entries)
            try:
                if events not in cache:
                    cache[events] = epsilon_checked(events, delta).epsilon
            except AccountingError as exc:
                v.fail(f"devices/{name}/{DEVICE_LEDGER}", f"accountants disagree: {exc}")
                continue
            v.record_epsilons[name] = cache[events]
        stored = privacy.get("record_level")
        if v.invalid - {SERVER_LEDGER}:
            pass  # a device ledger failed to load: its epsilon cannot be compared (already a problem)
        elif v.record_epsilons and stored is not None:
            ours = record_stats(list(v.record_epsilons.values()))
            if stored.get("clients") != len(v.record_epsilons):
                v.fail("summary.json", f"record level: {stored.get('clients')} devices, the run directory holds "
                                       f"{len(v.record_epsilons)} device ledgers")
            for k, value in ours.items():
                if not _close(value, stored.get(k)):
                    v.fail("summary.json", f"record-level epsilon {k} is {stored.get(k)}, recomputed from the "
                                           f"ledgers {value}")
        elif v.config.get("dp") in ("record", "both") and summary is not None:
            v.fail("summary.json", "no record-level epsilon, but the run ran record-level DP")
    if (v.server_entries or v.config.get("dp") in ("user", "both")) and SERVER_LEDGER not in v.invalid:
        delta = v.config["user-delta"]
        try:
            v.user = user_epsilon(v.server_entries, delta)
        except AccountingError as exc:
            v.fail(SERVER_LEDGER, f"accountants disagree: {exc}")
            return
        stored = privacy.get("user_level", {}).get("epsilon") if summary is not None else None
        if summary is not None and not _close(v.user.epsilon, stored):
            v.fail("summary.json", f"user-level epsilon is {stored}, recomputed from the server ledger {v.user.epsilon}")
        if federated is not None and not _close(v.user.epsilon, federated.get("user_epsilon")):
            v.fail("federated.json", f"user_epsilon is {federated.get('user_epsilon')}, recomputed {v.user.epsilon}")
        for row in rounds:
            prefix = [e for e in v.server_entries if e.round <= row["round"]]
            if not prefix:
                continue
            value = user_epsilon(prefix, delta).epsilon
            if not _close(value, row.get("user_epsilon")):
                v.fail("rounds.jsonl", f"round {row['round']}: user_epsilon {row.get('user_epsilon')}, "
                                       f"recomputed from the server ledger {value}")


def verify_run(run_dir: str | Path, server_key: str | None = None) -> Verification:
    """Check a run directory; `server_key` (hex) pins the server's public key instead of trusting the copy
    in the run directory."""
    v = Verification(Path(run_dir).resolve())
    if not v.run_dir.is_dir():
        v.fail(v.run_dir, "not a directory")
        return v
    federated = _load_json(v, "federated.json")
    summary = json.loads((v.run_dir / "summary.json").read_text()) if (v.run_dir / "summary.json").exists() else None
    if summary is None:
        v.warnings.append("summary.json missing (the run was not driven by `avrec simulate`): only the ledgers "
                          "and federated.json are compared")
    v.config = (federated or summary or {}).get("config", {})
    try:
        recorded = read_public(v.run_dir / "server")
    except SigningKeyError as exc:
        v.fail(v.run_dir / "server" / PUBLIC_NAME, str(exc))
        return v
    if server_key and server_key != recorded:
        v.fail(v.run_dir / "server" / PUBLIC_NAME, f"is {recorded}, not the pinned server key {server_key}")
    v.server_key = server_key or recorded
    try:
        v.manifest = read_manifest(v.run_dir, v.server_key)
    except ManifestError as exc:
        v.fail(v.run_dir / "audit-manifest.json", str(exc).split(": ", 1)[-1])
    rounds = []
    if (v.run_dir / "rounds.jsonl").exists():
        try:
            rounds = [json.loads(line) for line in (v.run_dir / "rounds.jsonl").read_text().splitlines() if line]
        except json.JSONDecodeError as exc:
            v.fail(v.run_dir / "rounds.jsonl", f"not valid JSON Lines ({exc})")
    _server(v)
    _devices(v)
    if v.config:
        _epsilons(v, summary, rounds, federated)
    exposed = sorted(str(p.relative_to(v.run_dir)) for p in v.run_dir.rglob(PRIVATE_NAME))
    if exposed:
        v.warnings.append(
            f"{len(exposed)} private signing keys lie inside the run directory (e.g. {exposed[0]}): in a simulation "
            "the server and every device share this disk, so the signatures show only that nobody without "
            "those keys changed the records; hand an auditor the directory without them"
        )
    return v
