"""Trust model `secure`, server side: plan a round of distributed DP, sum the devices' shares modulo
2^secure-bits, decode, and say what the ledger must record.

The server adds no noise: each device added its discrete Gaussian share before its update left it
(`shared.secure.noised_share`). Fewer shares than expected carry less noise, so a round is decoded only
when at least `secure-min-fraction` of the expected devices sent one (the worst case the budget check
assumes), and the ledger records how many were summed: the accountant charges exactly that noise.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from server.aggregate import Aggregate
from shared.config import RunConfig
from shared.privacy.distributed_dp import DDGPlan
from shared.secure import ShareError, check_share, decode_mean, dimension, round_plan


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
        valid, rejected = [], []
        for source, share in shares:
            try:
                check_share(share, self.plan, source)
            except ShareError as exc:
                rejected.append(str(exc))
                continue
            valid.append(share)
        if len(valid) < self.min_survivors:
            rejected.append(f"only {len(valid)} of {self.expected} expected shares arrived, fewer than "
                            f"secure-min-fraction allows ({self.min_survivors}): the round's sum is not decoded")
            return Aggregate(None, 0, rejected)
        return Aggregate(decode_mean(valid, self.plan, self.rotation_seed, self.denominator, reference), len(valid), rejected)

    def ledger_details(self, survivors: int) -> dict[str, Any]:
        return {"plan": dataclasses.asdict(self.plan), "survivors": survivors, "expected": self.expected,
                "min_survivors": self.min_survivors, "rotation_seed": self.rotation_seed,
                "trust_model": "secure", "noise": "discrete Gaussian shares added on the devices",
                "summed": "modulo 2^bits, computed directly in simulation; under secure aggregation when deployed"}
