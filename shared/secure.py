"""Trust model `secure`: what devices and server agree on for a round of distributed DP.

Each device clips its update to `user-clip-norm`, encodes it into Z_{2^secure-bits} with its own discrete
Gaussian share of the noise (`shared.privacy.distributed_dp`), and only the modular sum of the shares is
revealed. Both sides derive the round's plan from the run configuration, the expected number of devices and
the update's dimension, so nothing beyond those public values and a public rotation seed travels with it.
In simulation the server may compute that modular sum directly (the same encoding, arithmetic, noise shares
and dropout handling); with `secure-aggregation = true` (either engine) the shares travel through Flower's
SecAgg+ (`secagg_input`, `secagg_total`), and a deployed device never sends an unmasked share.

Through SecAgg+: Flower's mod quantises floats as round((clip(x, -R, R) + R) * T / 2R) with stochastic
rounding, so a share k in [0, T), T = 2^secure-bits, is sent as x = k - T/2 with R = T/2 and quantisation
range T: then (x + R) * T / 2R = k exactly (float64 holds these integers exactly, the scale is exactly 1,
and `_stochastic_round` leaves an exact integer unchanged: ceil(k) = k, and it subtracts 1 only where a
uniform draw is below ceil(k) - k = 0, never). The workflow sums the integers modulo 2^32 (exact while
N x T < 2^32: `shared.privacy.secagg_plan.plan`) and hands the strategy the mean (S - N T/2) / N of the
N devices' x; `secagg_total` recovers S and reduces it modulo 2^bits: the modular sum of the shares.
"""

from __future__ import annotations

import math
import secrets
from typing import Mapping

import numpy as np
import torch

from shared.config import RunConfig
from shared.privacy.distributed_dp import MECHANISM, DDGPlan, decode, encode, plan_ddg

__all__ = ["MECHANISM", "ShareError", "check_share", "decode_total", "dimension", "flatten",
           "noised_share", "sum_bound", "round_plan", "secagg_input", "secagg_ranges", "secagg_total", "unflatten"]


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


def decode_total(total: np.ndarray, plan: DDGPlan, rotation_seed: int, denominator: float,
                 reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Server side: a modular sum of shares (however it was computed), decoded, over the fixed denominator."""
    return unflatten(decode(total, plan, rotation_seed) / denominator, reference)


NOISE_TAIL = 10.0  # slack in the noise's norm, in standard deviations (a Gaussian exceeds it w.p. below e^-50)


def sum_bound(plan: DDGPlan, survivors: int) -> float:
    """The largest L2 norm (float units) of the decoded sum of `survivors` shares that followed the protocol:
    each encoded update has norm <= rounded_l2_bound (integer units), and their noise shares sum to a discrete
    Gaussian of std sqrt(survivors) x local_stddev per coordinate, whose norm stays below std (sqrt(D) +
    NOISE_TAIL). A share outside the protocol can move the sum by up to gamma 2^(bits-1) sqrt(D) (any residue
    per coordinate); with this bound on the sum it moves it by little more than all the devices together could."""
    std = math.sqrt(survivors) * plan.local_stddev
    return plan.gamma * (survivors * plan.rounded_l2_bound + std * (math.sqrt(plan.padded_dimension) + NOISE_TAIL))


def secagg_ranges(bits: int) -> tuple[float, int]:
    """(clipping_range, quantization_range) for `SecAggPlusWorkflow` carrying shares of `bits` bits."""
    return float(2 ** (bits - 1)), 2**bits


def secagg_input(share: torch.Tensor | np.ndarray, bits: int) -> np.ndarray:
    """Device side: the float64 vector x = k - 2^(bits-1) that Flower's mod quantises back to exactly k."""
    k = np.asarray(share, dtype=np.int64)
    if k.ndim != 1 or (k.size and (int(k.min()) < 0 or int(k.max()) >= 2**bits)):
        raise ShareError(f"a share must be a flat vector in [0, 2^{bits}), got shape {k.shape}")
    return k.astype(np.float64) - float(2 ** (bits - 1))


def secagg_total(mean: np.ndarray, devices: int, bits: int) -> np.ndarray:
    """Server side: the modular sum (int64 in [0, 2^bits)) of `devices` shares from the SecAgg+ workflow's
    mean of their `secagg_input` vectors: S = N * mean + N * 2^(bits-1), an integer below 2^32, recovered
    by rounding (the workflow's division by N leaves an error below 2^-19 at that size)."""
    if devices < 1:
        raise ShareError(f"{devices} devices: a secure sum needs at least one share")
    scaled = np.asarray(mean, dtype=np.float64).reshape(-1) * devices
    whole = np.rint(scaled)
    if not np.all(np.isfinite(scaled)) or float(np.max(np.abs(scaled - whole), initial=0.0)) > 1e-3:
        raise ShareError("the SecAgg+ mean times the device count is not an integer vector: the devices did not "
                         "send secure-bits shares (or the sum wrapped)")
    total = whole.astype(np.int64) + devices * 2 ** (bits - 1)
    if total.size and (int(total.min()) < 0 or int(total.max()) > devices * 2**bits):
        raise ShareError(f"the SecAgg+ sum lies outside [0, {devices} x 2^{bits}]: not a sum of {devices} shares")
    return np.bitwise_and(total, 2**bits - 1)
