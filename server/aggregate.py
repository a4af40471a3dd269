"""Server-side aggregation: client sampling, FedAvg over shared weights, and DP-FedAvg (user level).

FedAvg here weights every client equally: a client's example count is data-dependent, and weighting by
it would let one device's unbounded self-report steer the model and leak its size. Under user-level DP
(DP-FedAvg, McMahan et al. 2018) each client's whole update is clipped on the device (and the norm is
checked here), Gaussian noise of std `sigma * C` is added to the sum, and the sum is divided by a fixed
denominator, the expected number of sampled clients, so that one user changes the result by at most C /
denominator whatever happened to the others.

Without user-level DP the server sees every update in clear, and a plain mean lets one client move the model
as far as it likes (an update of norm 1e6 moves it by 1e6 / n). `Robust` (robust-aggregation) bounds that:
`norm-bound` scales each update down to at most a norm B before the mean (norm-bounded FedAvg; one client
then moves the mean by at most B / n), `trimmed-mean` cuts the largest and smallest fraction beta of every
coordinate's values before averaging the rest, `median` takes every coordinate's median (Yin et al., ICML
2018: coordinate-wise trimmed mean and median). Under user-level DP the device's clip is the bound and the
server only sums (a median of the noised sum does not exist); under trust-model secure the server sees only
the modular sum of the devices' shares, where a device that breaks the protocol is bounded only by the
modulus: server/secure_sum.py.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch

from shared.updates import UpdateError, check_update, clip_update, update_norm

COLUMNS = 1 << 16  # coordinates sorted at once by trimmed-mean and median (clients x this x 8 bytes)


def sample_clients(nodes: Sequence[int], fraction: float) -> tuple[list[int], bool]:
    """Poisson sampling: each node joins independently with probability `fraction`, drawn from the OS
    CSPRNG (`secrets`), independent of any data. Returns the sample and whether it is random (the
    condition for claiming amplification by sampling); fraction 1 takes everyone, not random."""
    if fraction >= 1.0:
        return list(nodes), False
    rng = secrets.SystemRandom()
    return [n for n in nodes if rng.random() < fraction], True


@dataclass(frozen=True)
class Robust:
    """How the valid updates are combined where the server sees them in clear (see top)."""

    kind: str = "none"  # none | norm-bound | trimmed-mean | median
    norm_bound: float = 10.0
    trim_fraction: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> "Robust":
        return cls(cfg.robust_aggregation, cfg.robust_norm_bound, cfg.robust_trim_fraction)

    def combine(self, valid: Sequence[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The combined update of `valid` (at least one), in the reference's dtypes."""
        if self.kind in ("trimmed-mean", "median"):
            return {k: coordinatewise(self.kind, [u[k] for u in valid], self.trim_fraction).to(ref.dtype)
                    for k, ref in reference.items()}
        if self.kind == "norm-bound":
            valid = [clip_update(u, self.norm_bound) for u in valid]
        return {k: (v / len(valid)).to(reference[k].dtype) for k, v in ordered_sum(valid, reference).items()}


def coordinatewise(kind: str, values: Sequence[torch.Tensor], trim_fraction: float) -> torch.Tensor:
    """Every coordinate's median, or its mean after cutting floor(trim_fraction * n) values at each end, over
    the n clients' tensors (in float64; sorted a block of coordinates at a time to bound memory)."""
    n = len(values)
    cut = (n - 1) // 2 if kind == "median" else int(trim_fraction * n)
    flat = torch.stack([v.reshape(-1) for v in values])  # (n, coordinates)
    out = torch.empty(flat.shape[1], dtype=torch.float64)
    for start in range(0, flat.shape[1], COLUMNS):
        block = flat[:, start:start + COLUMNS].double().sort(dim=0).values
        out[start:start + COLUMNS] = block[cut:n - cut].mean(dim=0)  # median: the one or two middle values
    return out.reshape(values[0].shape)


def ordered_sum(updates: Sequence[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float64 sum, taken in order of norm, not of arrival: float addition is not associative, and a
    canonical order makes the aggregate (and so a resumed run) independent of which reply came first."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
    for update in sorted(updates, key=update_norm):
        for k, v in update.items():
            total[k] += v.double()
    return total


@dataclass
class Aggregate:
    delta: dict[str, torch.Tensor] | None
    accepted: int
    rejected: list[str] = field(default_factory=list)  # one reason per rejected update
    notes: list[str] = field(default_factory=list)  # what the aggregation did beyond the plain rule (logged)


def aggregate(
    updates: Sequence[tuple[str, dict[str, torch.Tensor]]],
    reference: dict[str, torch.Tensor],
    user_dp: bool = False,
    clip_norm: float = 1.0,
    noise_multiplier: float = 0.0,
    expected_clients: float = 0.0,
    generator: torch.Generator | None = None,
    robust: Robust = Robust(),
) -> Aggregate:
    """Validate each `(source, update)` and combine the valid ones as `robust` says (or sum, noise and divide
    by the fixed `expected_clients` under user-level DP). Invalid updates are left out and reported."""
    if user_dp and robust.kind != "none":
        raise ValueError(f"robust aggregation {robust.kind!r} under user-level DP: the server only sums clipped updates")
    valid, rejected = [], []
    for source, update in updates:
        try:
            check_update(update, reference, clip_norm if user_dp else None, source)
        except UpdateError as exc:
            rejected.append(str(exc))
            continue
        valid.append(update)
    if user_dp:
        total = ordered_sum(valid, reference)
        return Aggregate(noised_mean(total, reference, clip_norm, noise_multiplier, expected_clients, generator), len(valid), rejected)
    if not valid:
        return Aggregate(None, 0, rejected)
    return Aggregate(robust.combine(valid, reference), len(valid), rejected)


def noised_mean(
    total: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """DP-FedAvg's release: the sum of clipped updates plus Gaussian noise of std `noise_multiplier *
    clip_norm`, over the fixed denominator. Also used under secure aggregation, where the server holds
    only the sum."""
    if expected_clients <= 0:
        raise ValueError(f"expected_clients = {expected_clients}: DP-FedAvg needs a positive fixed denominator")
    # The noise is added even when no update arrived: the mechanism the ledger records always runs.
    generator = generator or torch.Generator().manual_seed(secrets.randbits(62))
    std = noise_multiplier * clip_norm
    out = {}
    for k, v in total.items():
        noisy = v.double() + torch.normal(0.0, std, v.shape, generator=generator, dtype=torch.float64)
        out[k] = (noisy / expected_clients).to(reference[k].dtype)
    return out


def server_lr(cfg, server_round: int) -> float:
    """The server's learning rate in a round: server-learning-rate, decayed geometrically to
    server-lr-decay times it by the last round. Later rounds then add less of their DP noise to the model,
    whose older noise the training has already worked off."""
    progress = (server_round - 1) / max(1, cfg.num_rounds - 1)
    return cfg.server_learning_rate * cfg.server_lr_decay ** min(1.0, progress)


class ServerOptimizer:
    """Applies the aggregated update to the global weights: plain steps (`sgd`: x += lr * delta, or with
    `momentum` b the FedAvgM step x += lr * m, m = b m + delta, which averages the independent DP noise of
    successive rounds) or FedAdam (Reddi et al. 2021), whose per-coordinate scaling lets item rows that few
    clients touch move as fast as shared layers every client touches. All only post-process the aggregate."""

    def __init__(self, kind: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 momentum: float = 0.0) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"server-optimizer = {kind!r}: expected sgd or adam")
        self.kind, self.lr, self.beta1, self.beta2, self.tau, self.momentum = kind, lr, beta1, beta2, tau, momentum
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], lr: float | None = None) -> dict[str, torch.Tensor]:
        """The next global weights; `lr` overrides the learning rate for this step (a schedule)."""
        lr = self.lr if lr is None else lr
        if self.kind == "sgd":
            if self.momentum:
                self.m = {k: self.momentum * self.m[k] + d if k in self.m else d.clone() for k, d in delta.items()}
                delta = self.m
            return {k: v + lr * delta[k] for k, v in state.items()}
        out = {}
        for k, value in state.items():
            d = delta[k]
            self.m[k] = self.beta1 * self.m.get(k, torch.zeros_like(d)) + (1 - self.beta1) * d
            self.v[k] = self.beta2 * self.v.get(k, torch.zeros_like(d)) + (1 - self.beta2) * d * d
            out[k] = value + lr * self.m[k] / (self.v[k].sqrt() + self.tau)
        return out
