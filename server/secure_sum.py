"""Trust model `secure`, server side: plan a round of distributed DP, sum the devices' shares modulo
2^secure-bits, decode, and say what the ledger must record.

The server adds no noise: each device added its discrete Gaussian share before its update left it
(`shared.secure.noised_share`). Fewer shares than expected carry less noise, so a round is decoded only
when at least `secure-min-fraction` of the expected devices sent one (the worst case the budget check
assumes), and the ledger records how many were summed: the accountant charges exactly that noise.
The modular sum comes either from the shares themselves (`aggregate`, simulation without secure
aggregation) or from Flower's SecAgg+, which reveals only the sum (`decode`, server/secagg.py).

What bounds a malicious device: the server sees only the sum, so it cannot check one update's norm. A device
that breaks the protocol may send any residue in [0, 2^bits) per coordinate, which moves the decoded sum by up
to gamma 2^(bits-1) sqrt(D) in L2 norm (about 9,000 clip norms at the embedded default's 943 devices, 20 bits:
the sum of 9 times every device pushing one way). Honest shares keep the decoded sum below
`shared.secure.sum_bound` (their clipped updates plus their noise's norm with 10 standard deviations of slack),
so a decoded sum above it is scaled down to it (post-processing of the same release) and the round says so: one
device then moves the model by little more than all devices together could (n C plus the slack, over the fixed
denominator). Within that, it is bounded only by the clip it was asked to apply and did not; a proof of a
bounded norm per share (zero-knowledge range proofs) is not built.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from server.aggregate import Aggregate
from shared.config import RunConfig
from shared.privacy.distributed_dp import DDGPlan, modular_sum
from shared.secure import ShareError, check_share, decode_total, dimension, round_plan, sum_bound
from shared.updates import clip_update, update_norm


@dataclass(frozen=True)
class SecureRound:
    plan: DDGPlan
    rotation_seed: int  # public: every device rotates with it, the server inverts with it
    expected: int  # devices whose noise shares make up the planned noise
    min_survivors: int  # the fewest shares the round still decodes
    denominator: float  # DP-FedAvg's fixed denominator

    @classmethod
    def plan_round(cls, cfg: RunConfig, expected: float, reference: Mapping[str, torch.Tensor]) -> "SecureRound":
        n = max(1, round(expected))
        return cls(round_plan(cfg, n, dimension(reference)), secrets.randbits(62), n,
                   max(1, math.ceil(cfg.secure_min_fraction * n)), expected)

    def config(self) -> dict[str, int]:
        """What the train message tells each device, beyond the run configuration."""
        return {"secure-expected": self.expected, "secure-rotation-seed": self.rotation_seed}

    def aggregate(self, shares: Sequence[tuple[str, torch.Tensor]], reference: Mapping[str, torch.Tensor]) -> Aggregate:
        """The shares themselves (simulation without secure aggregation): check each, sum modulo 2^bits, decode."""
        valid, rejected = [], []
        for source, share in shares:
            try:
                check_share(share, self.plan, source)
            except ShareError as exc:
                rejected.append(str(exc))
                continue
            valid.append(share)
        total = modular_sum([s.numpy() for s in valid], self.plan.bits) if len(valid) >= self.min_survivors else None
        return self.decode(total, len(valid), reference, rejected)

    def decode(self, total: np.ndarray | None, survivors: int, reference: Mapping[str, torch.Tensor],
               rejected: Sequence[str] = ()) -> Aggregate:
        """The modular sum of `survivors` shares (summed here, or by SecAgg+), decoded over the fixed
        denominator; not decoded when fewer than secure-min-fraction of the expected shares make it up."""
        rejected = list(rejected)
        if survivors < self.min_survivors or total is None:
            rejected.append(f"only {survivors} of {self.expected} expected shares arrived, fewer than "
                            f"secure-min-fraction allows ({self.min_survivors}): the round's sum is not decoded")
            return Aggregate(None, 0, rejected)
        delta = decode_total(total, self.plan, self.rotation_seed, self.denominator, reference)
        limit = sum_bound(self.plan, survivors) / self.denominator
        if (norm := update_norm(delta)) <= limit:
            return Aggregate(delta, survivors, rejected)
        note = (f"the decoded sum of {survivors} shares has norm {norm * self.denominator:.6g}, above the "
                f"{limit * self.denominator:.6g} that clipped updates and their noise reach: a device sent a share "
                "outside the protocol; the sum is scaled down to that bound")
        return Aggregate(clip_update(delta, limit), survivors, rejected, [note])

    def ledger_details(self, survivors: int, secure_aggregation: str = "") -> dict[str, Any]:
        """What the ledger records; `secure_aggregation` names the protocol that summed the shares, if any."""
        summed = (f"modulo 2^bits by secure aggregation ({secure_aggregation}): the server saw only the sum"
                  if secure_aggregation else "modulo 2^bits, computed directly by the server from the shares (simulation)")
        details = {"plan": dataclasses.asdict(self.plan), "survivors": survivors, "expected": self.expected,
                   "min_survivors": self.min_survivors, "rotation_seed": self.rotation_seed,
                   "trust_model": "secure", "noise": "discrete Gaussian shares added on the devices", "summed": summed}
        if secure_aggregation:
            details["secure_aggregation"] = secure_aggregation
        return details
