"""Trust model `secure`: what devices and server agree on for a round of distributed DP.

Each device clips its update to `user-clip-norm`, encodes it into Z_{2^secure-bits} with its own discrete
Gaussian share of the noise (`shared.privacy.distributed_dp`), and only the modular sum of the shares is
revealed. Both sides derive the round's plan from the run configuration, the expected number of devices and
the update's dimension, so nothing beyond those public values and a public rotation seed travels with it.
In simulation the server computes that modular sum directly (the same encoding, arithmetic, noise shares and
dropout handling); on the deployment engine the shares travel masked by secure aggregation, and a deployed
device never sends an unmasked share.
"""

from __future__ import annotations

import secrets
from typing import Mapping, Sequence

import numpy as np
import torch

from shared.config import RunConfig
from shared.privacy.distributed_dp import MECHANISM, DDGPlan, decode, encode, modular_sum, plan_ddg

__all__ = ["MECHANISM", "ShareError", "check_share", "decode_mean", "dimension", "flatten", "noised_share",
           "round_plan", "unflatten"]


class ShareError(ValueError):
    """A share that must not enter the modular sum (wrong length, type or range)."""


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The update as one float64 vector, tensors in sorted-name order (the order both sides use)."""
    return np.concatenate([state[k].detach().double().reshape(-1).numpy() for k in sorted(state)])


def unflatten(vector: np.ndarray, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k in sorted(reference):
        n = reference[k].numel()
        out[k] = torch.from_numpy(vector[offset: offset + n].copy()).reshape(reference[k].shape).to(reference[k].dtype)
        offset += n
    return out


def dimension(reference: Mapping[str, torch.Tensor]) -> int:
    return sum(int(v.numel()) for v in reference.values())


def round_plan(cfg: RunConfig, expected_clients: int, dim: int) -> DDGPlan:
    """The round's plan: noise of std user-noise-multiplier x C split over the expected devices."""
    return plan_ddg(cfg.user_clip_norm, cfg.user_noise_multiplier, expected_clients, dim, cfg.secure_bits)


def noised_share(update: Mapping[str, torch.Tensor], cfg: RunConfig, expected_clients: int,
                 rotation_seed: int) -> torch.Tensor:
    """Device side: the update (already clipped, or zeros for a device that declined: its noise share still
    counts) as a share in [0, 2^bits), sent as int32 (secure-bits <= 30), half the bytes of int64. The noise
    comes from a generator seeded from the OS CSPRNG."""
    plan = round_plan(cfg, expected_clients, dimension(update))
    rng = np.random.default_rng(secrets.randbits(128))
    return torch.from_numpy(encode(flatten(update), plan, rotation_seed, rng).astype(np.int32))


def check_share(share: torch.Tensor, plan: DDGPlan, source: str) -> None:
    if share.dtype != torch.int32 or tuple(share.shape) != (plan.padded_dimension,):
        raise ShareError(f"share from {source}: {share.dtype} of shape {tuple(share.shape)}, expected int32 of shape "
                         f"({plan.padded_dimension},); the device runs a different model or secure-bits")
    if int(share.min()) < 0 or int(share.max()) >= 2**plan.bits:
        raise ShareError(f"share from {source}: values outside [0, 2^{plan.bits}); the device runs a different secure-bits")


def decode_mean(shares: Sequence[torch.Tensor], plan: DDGPlan, rotation_seed: int, denominator: float,
                reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Server side: the modular sum of the shares, decoded, over the fixed denominator."""
    total = modular_sum((s.numpy() for s in shares), plan.bits)
    return unflatten(decode(total, plan, rotation_seed) / denominator, reference)
