"""Server-side aggregation: client sampling, FedAvg over shared weights, and DP-FedAvg (user level).

FedAvg here weights every client equally: a client's example count is data-dependent, and weighting by
it would let one device's unbounded self-report steer the model and leak its size. Under user-level DP
(DP-FedAvg, McMahan et al. 2018) each client's whole update is clipped on the device (and the norm is
checked here), Gaussian noise of std `sigma * C` is added to the sum, and the sum is divided by a fixed
denominator, the expected number of sampled clients, so that one user changes the result by at most C /
denominator whatever happened to the others.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch

from shared.updates import UpdateError, check_update, update_norm


def sample_clients(nodes: Sequence[int], fraction: float) -> tuple[list[int], bool]:
    """Poisson sampling: each node joins independently with probability `fraction`, drawn from the OS
    CSPRNG (`secrets`), independent of any data. Returns the sample and whether it is random (the
    condition for claiming amplification by sampling); fraction 1 takes everyone, not random."""
    if fraction >= 1.0:
        return list(nodes), False
    rng = secrets.SystemRandom()
    return [n for n in nodes if rng.random() < fraction], True


@dataclass
class Aggregate:
    delta: dict[str, torch.Tensor] | None
    accepted: int
    rejected: list[str] = field(default_factory=list)  # one reason per rejected update


def aggregate(
    updates: Sequence[tuple[str, dict[str, torch.Tensor]]],
    reference: dict[str, torch.Tensor],
    user_dp: bool = False,
    clip_norm: float = 1.0,
    noise_multiplier: float = 0.0,
    expected_clients: float = 0.0,
    generator: torch.Generator | None = None,
) -> Aggregate:
    """Validate each `(source, update)` and average the valid ones (or sum, noise and divide by the
    fixed `expected_clients` under user-level DP). Invalid updates are left out and reported."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
    valid, rejected = [], []
    for source, update in updates:
        try:
            check_update(update, reference, clip_norm if user_dp else None, source)
        except UpdateError as exc:
            rejected.append(str(exc))
            continue
        valid.append(update)
    # Summed in order of norm, not of arrival: float addition is not associative, and a canonical order makes
    # the aggregate (and so a resumed run) independent of which reply came first.
    for update in sorted(valid, key=update_norm):
        for k, v in update.items():
            total[k] += v.double()
    accepted = len(valid)
    if user_dp:
        return Aggregate(noised_mean(total, reference, clip_norm, noise_multiplier, expected_clients, generator), accepted, rejected)
    if accepted == 0:
        return Aggregate(None, 0, rejected)
    delta = {k: (v / accepted).to(reference[k].dtype) for k, v in total.items()}
    return Aggregate(delta, accepted, rejected)


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
