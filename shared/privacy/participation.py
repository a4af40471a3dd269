"""User-level accounting per client from the server's ledger.

Each DP-FedAvg round is one Gaussian event. Where amplification is claimed (Poisson sampling from the
CSPRNG) the accountant charges that round, subsampled, to every user, sampled or not. Where it is not,
a round costs a user something only if the server chose it for that round: the choice is made by the
server from its own records (the cap and separation), never from data, so each user's sequence of
mechanisms is fixed in advance and composes. Its epsilon then composes the rounds it was chosen for
(`details["participants"]`, node ids). The reported user-level epsilon is the largest over clients.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from .accounting import AccountingError, EpsilonReport, SampledGaussian, epsilon, epsilon_checked
from .distributed_dp import MECHANISM as SECURE_SUM, DDGPlan, ddg_epsilon
from .ledger import LedgerEntry

EVERYONE = "*"  # a client that appears in no round's participant list


@dataclass(frozen=True)
class DDGRound:
    """One round of trust-model `secure`: the distributed discrete Gaussian over the shares actually summed."""

    plan: DDGPlan
    survivors: int
    sample_rate: float  # 1 where amplification is not claimed


Event = Union[SampledGaussian, DDGRound]


def accounted(entry: LedgerEntry) -> Event:
    """The mechanism an entry charges: a Gaussian event, or a DDG round rebuilt from its recorded plan."""
    if entry.mechanism != SECURE_SUM:
        return entry.event()
    try:
        recorded = entry.details["plan"]
        plan = DDGPlan(**{f.name: recorded[f.name] for f in dataclasses.fields(DDGPlan)})
        return DDGRound(plan, int(entry.details["survivors"]), entry.sample_rate if entry.amplification else 1.0)
    except (KeyError, TypeError, ValueError) as exc:
        raise AccountingError(f"round {entry.round}: a {SECURE_SUM} entry without a usable plan and survivor count "
                              f"in its details ({type(exc).__name__}: {exc})") from None


def history_epsilon(history: Sequence[Event], delta: float, fast: bool = False) -> EpsilonReport:
    """Epsilon of one client's history: Gaussian events through the checked accountants (or the RDP bound
    when `fast`), DDG rounds through their own RDP accountant. A history never mixes the two."""
    rounds = [e for e in history if isinstance(e, DDGRound)]
    if not rounds:
        if fast:
            value = epsilon(history, delta, accountant="rdp-fast")
            return EpsilonReport(value, delta, math.nan, math.nan, value, "rdp-fast")
        return epsilon_checked(history, delta)
    if len(rounds) != len(history):
        raise AccountingError("a user-level history mixes DDG rounds with Gaussian ones: one run, one trust model")
    value = ddg_epsilon([(r.plan, r.survivors, r.sample_rate) for r in rounds], delta)
    return EpsilonReport(value, delta, math.nan, math.nan, value,
                         "RDP of the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021)")


def participation(entries: Sequence[LedgerEntry]) -> Counter:
    """How many rounds each client (node id, as text) was chosen for."""
    return Counter(str(n) for e in entries for n in e.details.get("participants", ()))


def client_histories(entries: Sequence[LedgerEntry]) -> dict[str, tuple[Event, ...]]:
    """Each client's accounted events; non-amplified rounds without a participant list charge everyone."""
    clients = set(participation(entries)) | {EVERYONE}
    out: dict[str, list[Event]] = {c: [] for c in clients}
    for e in entries:
        chosen = e.details.get("participants")
        event = accounted(e)
        for c in clients:
            if e.amplification or chosen is None or c in {str(n) for n in chosen}:
                out[c].append(event)
    return {c: tuple(v) for c, v in out.items()}


def worst_history(entries: Sequence[LedgerEntry]) -> tuple[Event, ...]:
    """The history of the client charged the most (by the RDP bound, which orders histories here)."""
    histories = set(client_histories(entries).values())
    return max(histories, key=lambda h: (history_epsilon(h, 1e-5, fast=True).epsilon, len(h)))


def user_epsilon(entries: Sequence[LedgerEntry], delta: float) -> EpsilonReport:
    """The user-level epsilon of the most-charged client (PLD cross-checked, or the DDG accountant)."""
    reports = [history_epsilon(h, delta) for h in set(client_histories(entries).values())]
    return max(reports, key=lambda r: r.epsilon)


def schedule_problems(entries: Iterable[LedgerEntry], cap: int, separation: int) -> list[str]:
    """Where the recorded participation breaks the cap on rounds per client or their minimum separation."""
    problems = []
    count: Counter = Counter()
    last: dict[str, int] = {}
    for e in entries:
        for n in map(str, e.details.get("participants", ())):
            count[n] += 1
            if cap and count[n] > cap:
                problems.append(f"round {e.round}: client {n} chosen for a {count[n]}th round, over the cap {cap}")
            if n in last and e.round - last[n] < separation:
                problems.append(f"round {e.round}: client {n} chosen {e.round - last[n]} round(s) after its "
                                f"previous round {last[n]}, minimum separation {separation}")
            last[n] = e.round
    return problems
