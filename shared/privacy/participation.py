"""User-level accounting per client from the server's ledger.

Each DP-FedAvg round is one Gaussian event. Where amplification is claimed (Poisson sampling from the
CSPRNG) the accountant charges that round, subsampled, to every user, sampled or not. Where it is not,
a round costs a user something only if the server chose it for that round: the choice is made by the
server from its own records (the cap and separation), never from data, so each user's sequence of
mechanisms is fixed in advance and composes. Its epsilon then composes the rounds it was chosen for
(`details["participants"]`, node ids). The reported user-level epsilon is the largest over clients.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from .accounting import EpsilonReport, SampledGaussian, epsilon, epsilon_checked
from .ledger import LedgerEntry

EVERYONE = "*"  # a client that appears in no round's participant list


def participation(entries: Sequence[LedgerEntry]) -> Counter:
    """How many rounds each client (node id, as text) was chosen for."""
    return Counter(str(n) for e in entries for n in e.details.get("participants", ()))


def client_histories(entries: Sequence[LedgerEntry]) -> dict[str, tuple[SampledGaussian, ...]]:
    """Each client's accounted events; non-amplified rounds without a participant list charge everyone."""
    clients = set(participation(entries)) | {EVERYONE}
    out: dict[str, list[SampledGaussian]] = {c: [] for c in clients}
    for e in entries:
        chosen = e.details.get("participants")
        for c in clients:
            if e.amplification or chosen is None or c in {str(n) for n in chosen}:
                out[c].append(e.event())
    return {c: tuple(v) for c, v in out.items()}


def worst_history(entries: Sequence[LedgerEntry]) -> tuple[SampledGaussian, ...]:
    """The history of the client charged the most (by the RDP bound, which orders histories here)."""
    histories = set(client_histories(entries).values())
    return max(histories, key=lambda h: (epsilon(h, 1e-5, accountant="rdp-fast"), len(h)))


def user_epsilon(entries: Sequence[LedgerEntry], delta: float) -> EpsilonReport:
    """The user-level epsilon (PLD, cross-checked) of the most-charged client."""
    reports = [epsilon_checked(h, delta) for h in set(client_histories(entries).values())]
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
