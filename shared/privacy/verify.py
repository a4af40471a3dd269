"""`avrec audit verify RUN_DIR`: check every ledger, signature and head, bind the ledgers to the run's
configuration, and recompute every epsilon.

What it checks, each failure naming the file, the entry (number, round, mechanism), the recorded value, the
expected value and where that expectation comes from:
- the server's ledger and each device's ledger: canonical JSON lines, hash chain, an Ed25519 signature on
  every entry by that ledger's key, and the signed head (entry count and last hash), so that an edit, a
  reordering, an insertion or a truncation fails;
- the audit manifest the server signed at the end of the run: the server ledger's head, the last head each
  device reported, signed by that device (so that a device ledger rolled back together with its head,
  replaced, or deleted, fails, and so does a head the device never reported), and the SHA-256 of the
  configuration, which must equal that of the configuration in federated.json and in summary.json (so that
  a configuration edited after the run fails);
- the device ledgers: in the run directory (a simulation), or collected from deployed devices (`devices`, a
  folder per device); each is checked up to the head the manifest recorded for its key (a ledger that grew
  in a later run is checked up to it), and every head in the manifest needs its ledger;
- every entry against the mechanism its kind names and the run's configuration: `dp-sgd` (noise multiplier,
  clip norm, record-sample-rate, record-steps, Poisson sampling from the OS CSPRNG, the fixed divisor
  batch-size, and no data-dependent value such as the device's example count), `gaussian-history-release`
  (history-noise-multiplier, one unsampled release of sensitivity 1, on the data-independent schedule set
  by history-refresh-rounds), `dp-fedavg` (user noise multiplier and clip norm, a sample rate equal to
  fraction-train where amplification is claimed and 1 where it is not), `dp-fedavg-secagg` (the same,
  under secure-aggregation = true only) and `ddg-secure-sum` (trust-model = secure: the plan the
  configuration implies, enough surviving shares, and the protocol that summed them exactly when
  secure-aggregation = true); any other kind is refused;
- that no mechanism is missing: every round of rounds.jsonl that aggregated clients has its server entry
  under user-level DP and a `dp-sgd` entry in as many device ledgers under record-level DP, and every
  device that trained released its history summary;
- the amplification rule (claimed only for Poisson sampling from the OS CSPRNG) and the cap on rounds per
  client;
- every epsilon, recomputed from the recorded mechanisms with the checked accountant (PLD, cross-checked
  with Opacus PRV and RDP), against the numbers the run stored in summary.json, rounds.jsonl and
  federated.json.

A signature shows who wrote a record, not which noise ran: what it binds is the record to its writer's key.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .accounting import AccountingError, epsilon_checked
from .device_heads import DEVICE_LEDGER, signed_by_device
from .distributed_dp import MECHANISM as DDG_SECURE_SUM, plan_ddg
from .ledger import LedgerEntry, LedgerError, PrivacyLedger
from .manifest import MANIFEST_NAME, ManifestError, config_digest, read_manifest
from .participation import participation, schedule_problems, user_epsilon
from .signing import PUBLIC_NAME, PRIVATE_NAME, SigningKeyError, read_public

SERVER_LEDGER = "server-ledger.jsonl"
CSPRNG_SAMPLING = "poisson-csprng"
DP_SGD = "dp-sgd"
HISTORY_RELEASE = "gaussian-history-release"
DP_FEDAVG = "dp-fedavg"
DP_FEDAVG_SECAGG = "dp-fedavg-secagg"
DP_MODES_OF_LEVEL = {"record": ("record", "both"), "user": ("user", "both")}
_ABSENT = object()  # a details key the entry does not record


@dataclass
class Verification:
    run_dir: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    config_source: str = "federated.json"  # the file `config` was read from
    server_key: str = ""
    server_entries: list = field(default_factory=list)
    devices: dict[str, list] = field(default_factory=dict)  # ledger directory, relative to devices_root -> entries
    devices_root: Path | None = None  # where the device ledgers were read: run_dir/devices, state-dir, or --devices
    device_keys: dict[str, str] = field(default_factory=dict)
    record_epsilons: dict[str, float] = field(default_factory=dict)
    user: Any = None  # EpsilonReport of the most-charged client
    manifest: dict[str, Any] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)  # ledgers that failed to load: no epsilon compared

    @property
    def ok(self) -> bool:
        return not self.problems

    def where(self, path: Path | str) -> str:
        """`path` as messages name it: relative to the run directory where it lies inside it."""
        path = Path(path)
        try:
            return str(path.relative_to(self.run_dir))
        except ValueError:
            return str(path)

    def fail(self, where: Path | str, message: str) -> None:
        self.problems.append(f"{self.where(where)}: {message}")

    def configured(self, key: str) -> str:
        """Where a configured value comes from, for messages."""
        return f"{key} in the configuration, {self.config_source}"


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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        v.fail(path, f"not valid JSON ({exc}; truncated or edited?)")
        return None


# ------------------------------------------------------------------ mechanisms against the configuration


@dataclass(frozen=True)
class Expected:
    """What one field of a ledger entry must hold, and where that expectation comes from."""

    field: str  # an entry field, or "details.<key>"
    value: Any  # None: the source lacks it
    source: str


def _from_config(v: Verification, entry_field: str, key: str) -> Expected:
    return Expected(entry_field, v.config.get(key), v.configured(key))


def _recorded(entry: LedgerEntry, name: str) -> Any:
    if name.startswith("details."):
        return entry.details.get(name.removeprefix("details."), _ABSENT)
    return getattr(entry, name)


def _same(recorded: Any, expected: Any) -> bool:
    numbers = (int, float)
    if isinstance(recorded, numbers) and isinstance(expected, numbers) \
            and not isinstance(recorded, bool) and not isinstance(expected, bool):
        return _close(float(recorded), float(expected))
    return type(recorded) is type(expected) and recorded == expected


def _label(i: int, e: LedgerEntry) -> str:
    return f"entry {i} (round {e.round}, {e.mechanism})"


def _check_expected(v: Verification, path: Path, i: int, e: LedgerEntry, expected: Sequence[Expected]) -> None:
    for x in expected:
        got = _recorded(e, x.field)
        if x.value is None:
            v.fail(path, f"{_label(i, e)}: {x.field} is {got!r}, and cannot be checked: {x.source} is missing")
        elif not _same(got, x.value):
            shown = "absent" if got is _ABSENT else repr(got)
            v.fail(path, f"{_label(i, e)}: {x.field} is {shown}, expected {x.value!r} ({x.source})")


Rules = tuple[list[Expected], list[str]]  # expectations, and problems found directly (without the entry label)


def _dp_sgd_rules(v: Verification, e: LedgerEntry) -> Rules:
    mechanism = "the record-level DP-SGD mechanism: Poisson sampling from the OS CSPRNG, amplification claimed"
    expected = [
        _from_config(v, "noise_multiplier", "noise-multiplier"),
        _from_config(v, "clip_norm", "clip-norm"),
        _from_config(v, "sample_rate", "record-sample-rate"),
        _from_config(v, "steps", "record-steps"),
        Expected("sampling", CSPRNG_SAMPLING, mechanism),
        Expected("amplification", True, mechanism),
        _from_config(v, "details.divisor", "batch-size"),
    ]
    problems = []
    if "examples" in e.details:
        problems.append(
            f"details.examples is {e.details['examples']!r}: records the device's interaction count, which the "
            "mechanism must not depend on or reveal (expected no examples; the shape of DP-SGD comes from "
            f"record-sample-rate, record-steps and batch-size in the configuration, {v.config_source})")
    return expected, problems


def _history_rules(v: Verification, e: LedgerEntry) -> Rules:
    release = "the Gaussian history release: one unsampled release of the summary, each row of L2 norm <= 1"
    return [
        _from_config(v, "noise_multiplier", "history-noise-multiplier"),
        Expected("sample_rate", 1.0, release),
        Expected("steps", 1, release),
        Expected("clip_norm", 1.0, release),
        Expected("sampling", "none", release),
        Expected("amplification", False, release),
    ], []


def _user_sampling_rules(v: Verification, e: LedgerEntry) -> Rules:
    """Amplification is claimed at q = fraction-train, and only where fraction-train < 1."""
    fraction = v.config.get("fraction-train")
    if not e.amplification:
        return [Expected("sample_rate", 1.0, "an entry without amplification is accounted at q = 1 and records it")], []
    if fraction is not None and fraction >= 1.0:
        return [], [f"claims amplification at sample_rate {e.sample_rate!r}, but fraction-train is {fraction!r} "
                    f"({v.configured('fraction-train')}): every client takes part in every round, so no "
                    "amplification may be claimed (expected amplification false and sample_rate 1.0)"]
    return [Expected("sample_rate", fraction, v.configured("fraction-train")
                     + ": each client is sampled with that probability")], []


def _dp_fedavg_rules(v: Verification, e: LedgerEntry) -> Rules:
    expected, problems = _user_sampling_rules(v, e)
    expected = [_from_config(v, "noise_multiplier", "user-noise-multiplier"),
                _from_config(v, "clip_norm", "user-clip-norm"),
                Expected("steps", 1, "one DP-FedAvg aggregation per round"), *expected]
    if v.config.get("secure-aggregation") is True:
        problems.append(f"a plain dp-fedavg entry, but secure-aggregation is true ({v.configured('secure-aggregation')}),"
                        " under which the server records dp-fedavg-secagg")
    if v.config.get("trust-model", "central") != "central":
        problems.append(f"a dp-fedavg entry (noise added by the server), but trust-model is "
                        f"{v.config.get('trust-model')!r} ({v.configured('trust-model')})")
    return expected, problems


def _ddg_rules(v: Verification, e: LedgerEntry) -> Rules:
    """Trust model `secure`: the recorded plan must be the one the configuration implies for the recorded
    expected device count and dimension, and the shares summed at least the minimum the round decodes."""
    expected, problems = _user_sampling_rules(v, e)
    expected = [_from_config(v, "noise_multiplier", "user-noise-multiplier"),
                _from_config(v, "clip_norm", "user-clip-norm"),
                Expected("steps", 1, "one secure sum per round"), *expected]
    if v.config.get("trust-model") != "secure":
        problems.append(f"a {DDG_SECURE_SUM} entry, but trust-model is {v.config.get('trust-model')!r} "
                        f"({v.configured('trust-model')}), expected secure")
        return expected, problems
    d = e.details
    try:
        recorded, n, survivors = dict(d["plan"]), int(d["expected"]), int(d["survivors"])
        implied = plan_ddg(v.config["user-clip-norm"], v.config["user-noise-multiplier"], n,
                           int(recorded["dimension"]), v.config["secure-bits"]).__dict__
    except (KeyError, TypeError, ValueError) as exc:
        return expected, problems + [f"details do not describe a DDG round ({type(exc).__name__}: {exc})"]
    for name, value in implied.items():
        if not _same(recorded.get(name, _ABSENT), value):
            problems.append(f"details.plan.{name} is {recorded.get(name)!r}, expected {value!r} (the plan "
                            f"user-clip-norm, user-noise-multiplier and secure-bits imply for {n} expected devices, "
                            f"{v.config_source})")
    protocol = d.get("secure_aggregation")
    if v.config.get("secure-aggregation") is True and (not isinstance(protocol, str) or not protocol):
        problems.append(f"details.secure_aggregation is {protocol!r}, but secure-aggregation is true "
                        f"({v.configured('secure-aggregation')}): expected the protocol that summed the shares")
    elif v.config.get("secure-aggregation") is not True and protocol is not None:
        problems.append(f"details.secure_aggregation is {protocol!r}, but secure-aggregation is "
                        f"{v.config.get('secure-aggregation')!r} ({v.configured('secure-aggregation')}): no protocol ran")
    least = max(1, math.ceil(v.config.get("secure-min-fraction", 1.0) * n))
    if survivors < least or survivors > d.get("sampled", survivors):
        problems.append(f"details.survivors is {survivors}, expected {least} .. {d.get('sampled')} (secure-min-fraction "
                        f"of the {n} expected devices, at most those sampled): fewer shares carry less noise")
    return expected, problems


def _dp_fedavg_secagg_rules(v: Verification, e: LedgerEntry) -> Rules:
    # SecAgg+ may account an effective noise multiplier (quantised sum) below the configured one, which it
    # then records in details.configured_noise_multiplier.
    configured_field = ("details.configured_noise_multiplier" if "configured_noise_multiplier" in e.details
                        else "noise_multiplier")
    every = "SecAgg+ rounds go to every available client: no sampling, no amplification"
    expected = [_from_config(v, configured_field, "user-noise-multiplier"),
                _from_config(v, "clip_norm", "user-clip-norm"),
                Expected("steps", 1, "one DP-FedAvg aggregation per round"),
                Expected("amplification", False, every), Expected("sample_rate", 1.0, every)]
    problems = []
    if v.config.get("secure-aggregation") is not True:
        problems.append(f"records secure aggregation, but secure-aggregation is "
                        f"{v.config.get('secure-aggregation')!r} ({v.configured('secure-aggregation')}), expected true")
    protocol = e.details.get("secure_aggregation")
    if not isinstance(protocol, str) or not protocol:
        problems.append(f"details.secure_aggregation is {protocol!r}, expected the protocol that ran (e.g. 'secagg+')")
    configured = e.details.get("configured_noise_multiplier")
    if isinstance(configured, (int, float)) and e.noise_multiplier > configured and not _close(e.noise_multiplier, configured):
        problems.append(f"noise_multiplier (effective) is {e.noise_multiplier!r}, expected at most the configured "
                        f"{configured!r} (details.configured_noise_multiplier): quantisation never adds noise")
    return expected, problems


MECHANISMS: dict[str, dict[str, Callable[[Verification, LedgerEntry], Rules]]] = {
    "record": {DP_SGD: _dp_sgd_rules, HISTORY_RELEASE: _history_rules},
    "user": {DP_FEDAVG: _dp_fedavg_rules, DP_FEDAVG_SECAGG: _dp_fedavg_secagg_rules, DDG_SECURE_SUM: _ddg_rules},
}


def _check_mechanisms(v: Verification, path: Path, entries: Sequence[LedgerEntry], level: str) -> None:
    """Each entry against the mechanism its kind names and the configuration; unknown kinds are refused."""
    dp = v.config.get("dp")
    if entries and dp not in DP_MODES_OF_LEVEL[level]:
        v.fail(path, f"holds {len(entries)} {level}-level entries, but dp is {dp!r} ({v.configured('dp')}), "
                     f"expected one of {DP_MODES_OF_LEVEL[level]}")
    kinds = MECHANISMS[level]
    for i, e in enumerate(entries, start=1):
        rules = kinds.get(e.mechanism)
        if rules is None:
            v.fail(path, f"{_label(i, e)}: unknown mechanism kind {e.mechanism!r} in a {level}-level ledger, "
                         f"expected one of {', '.join(kinds)}")
            continue
        expected, problems = rules(v, e)
        _check_expected(v, path, i, e, expected)
        for problem in problems:
            v.fail(path, f"{_label(i, e)}: {problem}")


def _check_amplification_source(v: Verification, path: Path, entries: Sequence[LedgerEntry]) -> None:
    for i, e in enumerate(entries, start=1):
        source = str(e.details.get("sampling_source", ""))
        if e.amplification and (e.sampling != CSPRNG_SAMPLING or "CSPRNG" not in source):
            v.fail(path, f"{_label(i, e)}: claims amplification by sampling, but its sampling is {e.sampling!r} from "
                         f"{e.details.get('sampling_source', 'an unstated source')!r}; expected {CSPRNG_SAMPLING!r} "
                         "from the OS CSPRNG, the only sampling that earns it")


def _check_history_schedule(v: Verification, path: Path, entries: Sequence[LedgerEntry]) -> None:
    """A device that trains releases its history summary in its first round, then again exactly when
    history-refresh-rounds (> 0) rounds of a run have passed since its last release, or in its first round of
    a later run (details.run; rounds count afresh per run): a data-independent schedule."""
    refresh = v.config.get("history-refresh-rounds") or 0
    source = f"history-refresh-rounds = {refresh} in the configuration, {v.config_source}"
    last: int | None = None
    last_run = ""
    for i, e in enumerate(entries, start=1):
        run = e.details.get("run", "")
        if refresh > 0 and last is not None and run != last_run:
            last = None  # a new run: its first round releases
        last_run = run
        due = last is None or (refresh > 0 and e.round - last >= refresh)
        if e.mechanism == HISTORY_RELEASE:
            if not due:
                expected = "no further release" if refresh == 0 else f"releases at least {refresh} rounds apart"
                v.fail(path, f"{_label(i, e)}: a release {e.round - last} round(s) after the previous one (round "
                             f"{last}), expected {expected} ({source}): releases must follow the data-independent "
                             "schedule")
            last = e.round
        elif e.mechanism == DP_SGD and due:
            found = ("no gaussian-history-release in this or any earlier round, expected one in the device's first "
                     "round" if last is None else
                     f"no gaussian-history-release in this round, {e.round - last} rounds after the last (round "
                     f"{last}), expected one every {refresh} rounds")
            v.fail(path, f"{_label(i, e)}: {found} ({source}): a device trains on its noised history summary")
            last = e.round  # report each missed release once, then go on from where it was due


def _check_history_config(v: Verification) -> None:
    sigma = v.config.get("history-noise-multiplier")
    if v.config.get("dp") in DP_MODES_OF_LEVEL["record"] and not (isinstance(sigma, (int, float)) and sigma > 0):
        v.fail(v.config_source, f"history-noise-multiplier is {sigma!r} under record-level DP, expected a value > 0: "
                                "the history summary would be released without (accounted) noise")


# ------------------------------------------------------------------------------------------ ledgers


def _load_ledger(v: Verification, path: Path, level: str, key: str, name: str) -> PrivacyLedger | None:
    try:
        return PrivacyLedger(path, level, public_key=key)
    except LedgerError as exc:
        v.fail(path, str(exc).replace(str(path), "").lstrip(", :"))
        v.invalid.add(name)  # its epsilon cannot be recomputed
        return None


def _check_server_head(v: Verification, path: Path, entries: Sequence[LedgerEntry]) -> None:
    if not v.manifest:
        return
    head = v.manifest.get("server_ledger")
    if head is None or head["entries"] != len(entries) or head["last_hash"] != (entries[-1].hash if entries else ""):
        v.fail(path, f"does not match the server ledger head in the signed manifest ({head}): "
                     f"the file holds {len(entries)} entries")
    if dict(participation(entries)) != v.manifest.get("participation"):
        v.fail(path, "per-client participation counts differ from those in the signed manifest")


def _check_one_entry_per_round(v: Verification, path: Path, entries: Sequence[LedgerEntry]) -> None:
    rounds = [e.round for e in entries]
    if len(set(rounds)) != len(rounds):
        v.fail(path, f"more than one DP-FedAvg entry for a round: rounds {rounds}, expected one entry per round")


def _check_schedule(v: Verification, path: Path, entries: Sequence[LedgerEntry]) -> None:
    if any(e.amplification for e in entries):
        return
    cap, sep = v.config.get("max-rounds-per-client", 0), v.config.get("min-round-separation", 1)
    for problem in schedule_problems(entries, cap, sep):
        v.fail(path, problem)


def _server(v: Verification) -> None:
    path = v.run_dir / SERVER_LEDGER
    if not path.exists():
        if v.config.get("dp") in DP_MODES_OF_LEVEL["user"]:
            v.fail(path, f"missing, but the run ran user-level DP (dp = {v.config.get('dp')} in {v.config_source})")
        return
    ledger = _load_ledger(v, path, "user", v.server_key, SERVER_LEDGER)
    if ledger is None:
        return
    v.server_entries = ledger.entries
    _check_mechanisms(v, path, ledger.entries, "user")
    _check_amplification_source(v, path, ledger.entries)
    _check_one_entry_per_round(v, path, ledger.entries)
    _check_server_head(v, path, ledger.entries)
    _check_schedule(v, path, ledger.entries)


def _check_device_head(v: Verification, path: Path, entries: Sequence[LedgerEntry], head: dict | None) -> None:
    if not v.manifest or not entries:
        return
    if head is None:
        v.fail(path, "its key is not among the device heads the server recorded in the signed manifest (a ledger "
                     "of another run, or re-signed with another key)")
    elif head["entries"] != len(entries) or head["last_hash"] != entries[-1].hash:
        v.fail(path, f"the device last reported {head['entries']} entries ending in {str(head['last_hash'])[:16]}...; "
                     f"the file holds {len(entries)} entries (rolled back or replaced after the run)")


def _check_reported_heads(v: Verification, reported: dict[str, dict]) -> None:
    """Every head in the manifest carries its device's signature: the server cannot record a head (and so a
    ledger length) that the device never reported."""
    for key, head in reported.items():
        if not signed_by_device(key, head):
            v.fail(MANIFEST_NAME, f"the head it records for device key {key[:16]}... ({head.get('entries')} entries "
                                  f"ending in {str(head.get('last_hash'))[:16]}...) is not signed by that key: a head "
                                  "the device never reported")


def _this_runs_entries(v: Verification, path: Path, entries: list[LedgerEntry], key: str,
                       head: dict | None) -> list[LedgerEntry]:
    """A ledger that grew after the head this run's manifest recorded, and its device signed (the device took
    part in a later run), is checked and accounted up to that head; anything else is compared whole
    (`_check_device_head`)."""
    n = head.get("entries") if head else None
    if (isinstance(n, int) and 0 < n < len(entries) and entries[n - 1].hash == head.get("last_hash")
            and signed_by_device(key, head)):
        v.warnings.append(f"{v.where(path)}: {len(entries) - n} entries follow the head this run's manifest recorded "
                          f"(a later run's): checked and accounted up to entry {n}")
        return entries[:n]
    return entries


def _ledger_paths(v: Verification, collected: Path | None) -> tuple[Path, list[Path]]:
    """Where the device ledgers lie, and the ledgers: collected from deployed devices (a folder per device,
    each user's ledger in its own directory at any depth), else the run directory's devices/ (a simulation),
    else the configured state-dir."""
    if collected is not None:
        root = Path(collected).resolve()
        return root, sorted(root.rglob(DEVICE_LEDGER)) if root.is_dir() else []
    root = v.run_dir / "devices"
    if not root.exists():
        root = Path(v.config.get("state-dir") or root)
    return root, sorted(root.glob(f"*/{DEVICE_LEDGER}"))


def _devices(v: Verification, collected: Path | None) -> None:
    root, paths = _ledger_paths(v, collected)
    v.devices_root = root
    if collected is not None and not root.is_dir():
        v.fail(root, "not a directory: --devices names the folder holding the ledgers collected from the deployed "
                     "devices (a folder per device, each holding its users' state directories)")
    reported = dict(v.manifest.get("device_heads", {}))
    _check_reported_heads(v, reported)
    seen: dict[str, Path] = {}
    for path in paths:
        name = path.parent.relative_to(root).as_posix()
        try:
            key = read_public(path.parent)
        except SigningKeyError as exc:
            v.fail(path, str(exc).replace(str(path), "").lstrip(", :"))
            v.invalid.add(name)
            continue
        if key in seen:
            v.fail(path, f"a second ledger of device key {key[:16]}... (the first is {v.where(seen[key])}): supply one "
                         "copy of each device's ledger, the latest")
            v.invalid.add(name)
            continue
        seen[key] = path
        head = reported.pop(key, None)
        ledger = _load_ledger(v, path, "record", key, name)
        if ledger is None:
            continue
        entries = _this_runs_entries(v, path, ledger.entries, key, head)
        v.devices[name], v.device_keys[name] = entries, key
        _check_mechanisms(v, path, entries, "record")
        _check_amplification_source(v, path, entries)
        _check_history_schedule(v, path, entries)
        _check_device_head(v, path, entries, head)
    for key, head in reported.items():
        found, hint = ((f"for which {v.where(root)} holds no ledger (not collected from its device, or deleted)", "")
                       if collected is not None else ("that is not in the run directory (deleted)", " (ledgers "
                       "collected from deployed devices are passed with --devices DIR)"))
        v.fail(root, f"the signed manifest names a device ledger ({head.get('entries')} entries, key {key[:16]}...) "
                     f"{found}: its mechanisms cannot be checked or accounted{hint}")


# ------------------------------------------------------------------------ the run's own records


def _check_config_digest(v: Verification, federated: dict | None, summary: dict | None) -> None:
    """The configuration in federated.json and summary.json against the digest in the signed manifest."""
    if not v.manifest:
        return  # the manifest failed to load: already a problem
    recorded = v.manifest.get("config_sha256")
    if not recorded:
        v.fail(MANIFEST_NAME, "records no config_sha256: the configuration cannot be bound to the run")
        return
    configs = {name: doc.get("config") for name, doc in (("federated.json", federated), ("summary.json", summary))
               if doc is not None}
    for name, config in configs.items():
        if not isinstance(config, dict):
            v.fail(name, f"holds no configuration, expected one hashing to the config_sha256 {recorded} of the "
                         f"signed {MANIFEST_NAME}")
        elif (digest := config_digest(config)) != recorded:
            v.fail(name, f"its configuration hashes to {digest}, expected the config_sha256 {recorded} of the signed "
                         f"{MANIFEST_NAME} (configuration edited after the run)")
    fed, summ = configs.get("federated.json"), configs.get("summary.json")
    if isinstance(fed, dict) and isinstance(summ, dict) and fed != summ:
        keys = sorted(k for k in fed.keys() | summ.keys() if fed.get(k, _ABSENT) != summ.get(k, _ABSENT))
        shown = "; ".join(f"{k} is {summ.get(k)!r}, federated.json has {fed.get(k)!r}" for k in keys[:6])
        v.fail("summary.json", f"its configuration differs from federated.json's: {shown}")


def _check_user_rounds(v: Verification, rounds: Sequence[dict]) -> None:
    """Under user-level DP every round that aggregated clients has its server entry, with the same count."""
    if v.config.get("dp") not in DP_MODES_OF_LEVEL["user"] or SERVER_LEDGER in v.invalid:
        return
    by_round = {e.round: (i, e) for i, e in enumerate(v.server_entries, start=1)}
    for row in rounds:
        n, found = row.get("clients_aggregated") or 0, by_round.get(row["round"])
        if found is None:
            if n:
                v.fail("rounds.jsonl", f"round {row['round']}: {n} clients aggregated under user-level DP (dp = "
                                       f"{v.config.get('dp')} in {v.config_source}), but {SERVER_LEDGER} has no entry "
                                       f"for round {row['round']}, expected one {DP_FEDAVG} or {DP_FEDAVG_SECAGG} entry")
            continue
        i, e = found
        recorded = e.details.get("aggregated", n)
        if recorded != n:
            v.fail(SERVER_LEDGER, f"{_label(i, e)}: details.aggregated is {recorded!r}, expected {n} "
                                  f"(clients_aggregated of round {row['round']} in rounds.jsonl)")


def _check_record_rounds(v: Verification, rounds: Sequence[dict]) -> None:
    """Under record-level DP every client aggregated in a round trained with DP-SGD in it: at least that many
    device ledgers record a dp-sgd entry for the round (a device may hold several users, one ledger each)."""
    if v.config.get("dp") not in DP_MODES_OF_LEVEL["record"] or v.invalid - {SERVER_LEDGER}:
        return
    run = v.manifest.get("run_id")  # device ledgers may hold earlier runs too: count this run's entries
    for row in rounds:
        n = row.get("clients_aggregated") or 0
        trained = sum(any(e.round == row["round"] and e.mechanism == DP_SGD and (run is None or e.details.get("run", "") == run)
                          for e in es) for es in v.devices.values())
        if trained < n:
            v.fail("rounds.jsonl", f"round {row['round']}: {n} clients aggregated under record-level DP (dp = "
                                   f"{v.config.get('dp')} in {v.config_source}), but only {trained} device ledgers "
                                   f"record a {DP_SGD} entry for round {row['round']}, expected at least {n}")


# --------------------------------------------------------------------------------------- epsilons


def _record_epsilons(v: Verification, privacy: dict, have_summary: bool) -> None:
    delta = v.config["delta"]
    cache: dict[tuple, float] = {}
    for name, entries in v.devices.items():
        events = tuple(e.event() for e in entries)
        try:
            if events not in cache:
                cache[events] = epsilon_checked(events, delta).epsilon
        except AccountingError as exc:
            v.fail(v.devices_root / name / DEVICE_LEDGER, f"accountants disagree: {exc}")
            continue
        v.record_epsilons[name] = cache[events]
    stored = privacy.get("record_level")
    if v.invalid - {SERVER_LEDGER}:
        return  # a device ledger failed to load: its epsilon cannot be compared (already a problem)
    if v.record_epsilons and stored is not None:
        ours = record_stats(list(v.record_epsilons.values()))
        if stored.get("clients") != len(v.record_epsilons):
            v.fail("summary.json", f"record level: {stored.get('clients')} devices, but {len(v.record_epsilons)} device "
                                   f"ledgers were read (from {v.where(v.devices_root)})")
        for k, value in ours.items():
            if not _close(value, stored.get(k)):
                v.fail("summary.json", f"record-level epsilon {k} is {stored.get(k)}, recomputed from the ledgers {value}")
    elif v.config.get("dp") in DP_MODES_OF_LEVEL["record"] and have_summary:
        v.fail("summary.json", "no record-level epsilon, but the run ran record-level DP")


def _user_epsilons(v: Verification, privacy: dict, summary: dict | None, rounds: Sequence[dict],
                   federated: dict | None) -> None:
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


def _epsilons(v: Verification, summary: dict | None, rounds: list[dict], federated: dict | None) -> None:
    privacy = (summary or {}).get("privacy", {})
    if v.devices:
        _record_epsilons(v, privacy, summary is not None)
    if (v.server_entries or v.config.get("dp") in DP_MODES_OF_LEVEL["user"]) and SERVER_LEDGER not in v.invalid:
        _user_epsilons(v, privacy, summary, rounds, federated)


# ------------------------------------------------------------------------------------------- run


def _read_rounds(v: Verification) -> list[dict]:
    path = v.run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except json.JSONDecodeError as exc:
        v.fail(path, f"not valid JSON Lines ({exc})")
        return []


def _read_server_key(v: Verification, pinned: str | None) -> bool:
    try:
        recorded = read_public(v.run_dir / "server")
    except SigningKeyError as exc:
        v.fail(v.run_dir / "server" / PUBLIC_NAME, str(exc))
        return False
    if pinned and pinned != recorded:
        v.fail(v.run_dir / "server" / PUBLIC_NAME, f"is {recorded}, not the pinned server key {pinned}")
    v.server_key = pinned or recorded
    return True


def _warn_exposed_keys(v: Verification, collected: Path | None) -> None:
    for root, what in ((v.run_dir, "the run directory"), (collected, "the collected device ledgers")):
        exposed = sorted(v.where(p) for p in Path(root).rglob(PRIVATE_NAME)) if root else []
        if exposed:
            v.warnings.append(
                f"{len(exposed)} private signing keys lie inside {what} (e.g. {exposed[0]}): whoever holds them "
                "(in a simulation the server and every device share this disk) can re-sign the records, so the "
                "signatures show only that nobody without those keys changed them; hand an auditor copies without them"
            )


def verify_run(run_dir: str | Path, server_key: str | None = None, devices: str | Path | None = None) -> Verification:
    """Check a run directory; `server_key` (hex) pins the server's public key instead of trusting the copy
    in the run directory; `devices` names the ledgers collected from deployed devices (a folder per device)
    instead of the run directory's devices/."""
    v = Verification(Path(run_dir).resolve())
    collected = Path(devices) if devices is not None else None
    if not v.run_dir.is_dir():
        v.fail(v.run_dir, "not a directory")
        return v
    federated = _load_json(v, "federated.json")
    summary = _load_json(v, "summary.json") if (v.run_dir / "summary.json").exists() else None
    if summary is None:
        v.warnings.append("summary.json missing (the run was not driven by `avrec simulate`): only the ledgers "
                          "and federated.json are compared")
    v.config_source = "federated.json" if federated and "config" in federated else "summary.json"
    v.config = (federated or summary or {}).get("config", {})
    if not _read_server_key(v, server_key):
        return v
    try:
        v.manifest = read_manifest(v.run_dir, v.server_key)
    except ManifestError as exc:
        v.fail(v.run_dir / MANIFEST_NAME, str(exc).split(": ", 1)[-1])
    rounds = _read_rounds(v)
    _check_config_digest(v, federated, summary)
    _check_history_config(v)
    _server(v)
    _devices(v, collected)
    _check_user_rounds(v, rounds)
    _check_record_rounds(v, rounds)
    if v.config:
        _epsilons(v, summary, rounds, federated)
    _warn_exposed_keys(v, collected)
    return v
