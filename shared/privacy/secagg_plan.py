"""SecAgg+ parameters that cannot wrap, and the rounding error the DP accounting must include.

Why: Flower 1.41's SecAgg+ sums integers modulo `modulus_range` (2^32). If the true integer sum of a
round reaches the modulus it wraps silently: 1,025 devices at 22 bits turned a true sum of 0.062 into
63.6, so one device could move the output by about N * C while the ledger recorded C. `plan` refuses
such parameters; `rounding_bound` and `effective_sensitivity` bound what stochastic rounding adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The arithmetic, as read in flwr 1.41 (avrec sends weight `num_examples = 1` with `max_weight = 1`):
# - flwr/client/mod/secure_aggregation/secaggplus_mod.py `_collect_masked_vectors`: the weight factor
#   is `q_ratio = round(num_examples / max_weight * quantization_range)` (= T = 2^bits here); the update is
#   multiplied by `q_ratio / T` (= 1) and quantised by flwr/common/secure_aggregation/quantization.py
#   `quantize`: clip to [-C, C], then `(x + C) * T / (2C)` stochastically rounded (`_stochastic_round`) to
#   an integer in [0, T] (both ends included: x = C gives T). `factor_combine` prepends `q_ratio`, masks
#   drawn in [0, modulus) are added and everything is taken `parameters_mod(..., modulus)`.
# - flwr/server/workflow/secure_aggregation/secaggplus_workflow.py `collect_masked_vectors_stage` and
#   `unmask_stage`: the server adds the N masked vectors, removes the masks, takes the result modulo the
#   modulus, reads the factor sum `q_total = N * T` and returns
#   `(dequantize(sum) - (N - 1) * C) * T / q_total`: the mean of the N dequantised updates.
# So each of the N devices adds at most T to every slot (exactly T to the factor slot): the sums are
# exact iff N * T < modulus; at N * T >= modulus the factor itself wraps (to 0 at N * T = modulus).
# Flower's own check (`_check_init_params`) only warns when `num_shares` > modulus / T, which does not
# bound N. Flower documents `modulus_range` "must be less than 4294967296" (its default is 2^32 itself),
# so avrec keeps 2^32 and refuses rather than re-planning with a larger modulus.

__all__ = ["FLOWER_MODULUS", "SecAggPlan", "SecAggRangeError", "effective_noise_multiplier",
           "effective_sensitivity", "plan", "rounding_bound"]

FLOWER_MODULUS = 2**32  # SecAggPlusWorkflow's default `modulus_range`, the largest it documents


class SecAggRangeError(ValueError):
    """SecAgg+ parameters under which the modular sum of a round can wrap."""


@dataclass(frozen=True)
class SecAggPlan:
    """The parameters to hand `SecAggPlusWorkflow` for rounds of at most `max_devices` devices."""

    devices: int  # the most devices whose vectors one round may sum
    bits: int
    clip_range: float  # C: Flower's `clipping_range`
    modulus: int  # Flower's `modulus_range`
    max_weight: float = 1.0  # every device reports weight 1 = max_weight, so its factor is exactly T

    @property
    def quantization_range(self) -> int:
        """T = 2^bits: Flower's `quantization_range` (values 0 .. T inclusive)."""
        return 2**self.bits

    @property
    def max_devices(self) -> int:
        """The most devices for which N * T < modulus."""
        return (self.modulus - 1) // self.quantization_range

    @property
    def step(self) -> float:
        """One quantisation level: `quantize` scales by T / (2C), `dequantize` by 2C / T."""
        return 2 * self.clip_range / self.quantization_range

    def details(self, dimension: int, aggregated: int) -> dict[str, Any]:
        """What the ledger records about the secure sum of `aggregated` devices' `dimension` coordinates."""
        return {"quantization_bits": self.bits, "quantization_range": self.quantization_range,
                "modulus": self.modulus, "clip_range": self.clip_range, "max_weight": self.max_weight,
                "max_devices": self.max_devices, "planned_devices": self.devices, "dimension": dimension,
                "step": self.step, "rounding_bound_l2": rounding_bound(self, dimension, aggregated),
                "sensitivity": effective_sensitivity(self, dimension)}


def plan(devices: int, bits: int, clip_range: float, modulus: int = FLOWER_MODULUS) -> SecAggPlan:
    """The SecAgg+ plan for rounds of up to `devices` devices, or SecAggRangeError if a sum can wrap."""
    if not (isinstance(devices, int) and devices >= 1):
        raise SecAggRangeError(f"{devices!r} devices per round: expected an integer >= 1")
    if not (isinstance(bits, int) and 1 <= bits <= 30):  # `_stochastic_round` casts to int32
        raise SecAggRangeError(f"secagg-quantization-bits = {bits!r}: expected an integer 1 .. 30")
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise SecAggRangeError(f"clipping range {clip_range!r}: expected a finite number > 0")
    if not (isinstance(modulus, int) and 2 <= modulus <= FLOWER_MODULUS and modulus & (modulus - 1) == 0):
        raise SecAggRangeError(f"modulus {modulus!r}: Flower 1.41 needs a power of 2 no larger than 2^32")
    p = SecAggPlan(devices, bits, float(clip_range), modulus)
    if devices * p.quantization_range >= modulus:
        fit = (modulus - 1) // devices  # the largest T with devices * T < modulus
        fix = f"secagg-quantization-bits <= {fit.bit_length() - 1} or " if fit else ""
        raise SecAggRangeError(
            f"{devices:,} devices x 2^{bits} levels = {devices * p.quantization_range:,} >= Flower's SecAgg+ modulus "
            f"2^{modulus.bit_length() - 1}: the secure sum would wrap (expected devices x 2^bits < modulus, i.e. at "
            f"most {p.max_devices:,} devices at {bits} bits); use {fix}at most {p.max_devices:,} devices per round")
    return p


def rounding_bound(p: SecAggPlan, dimension: int, devices: int) -> float:
    """L2 bound on |secure sum - true sum| of `devices` clipped updates of `dimension` coordinates.

    Stochastic rounding moves each coordinate of each device by less than one level (`step`), so the
    sum moves by less than devices * step per coordinate, sqrt(dimension) * devices * step in L2.
    Valid only while the sum does not wrap (`plan` accepted at least `devices`)."""
    return math.sqrt(dimension) * devices * p.step


def effective_sensitivity(p: SecAggPlan, dimension: int) -> float:
    """L2 bound on one device's quantised, rounded update: C + sqrt(dimension) * step. Adding or
    removing one device moves the secure sum by at most this, so DP is accounted against it."""
    return p.clip_range + math.sqrt(dimension) * p.step


def effective_noise_multiplier(noise_multiplier: float, p: SecAggPlan, dimension: int) -> float:
    """The noise multiplier accounted: noise std (noise_multiplier * C) over the effective sensitivity."""
    return noise_multiplier * p.clip_range / effective_sensitivity(p, dimension)
