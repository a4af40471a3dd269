"""SecAgg+ range planning (shared/privacy/secagg_plan.py) against Flower 1.41's own arithmetic: the
quantisation, masking and modular sum of `secaggplus_mod` and `SecAggPlusWorkflow`, reproduced with
Flower's helpers on real numbers (no simulation: seconds)."""

import math

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from shared.privacy.secagg_plan import (
    FLOWER_MODULUS,
    SecAggRangeError,
    effective_noise_multiplier,
    effective_sensitivity,
    plan,
    rounding_bound,
)

C = 1.0


def flower_secure_mean(updates: list[np.ndarray], clip: float, target: int, modulus: int = FLOWER_MODULUS) -> np.ndarray:
    """What SecAggPlusWorkflow hands the strategy, each device weighing 1 with max_weight 1: the device
    side of `secaggplus_mod._collect_masked_vectors` (private masks only; pairwise masks cancel the same
    way) and the server side of `collect_masked_vectors_stage` / `unmask_stage`, line for line."""
    total, masks = None, []
    for i, update in enumerate(updates):
        q_ratio = round(1.0 / 1.0 * target)
        params = parameters_multiply([update], q_ratio / target)
        vec = factor_combine(q_ratio, quantize(params, clip, target))
        mask = pseudo_rand_gen(i.to_bytes(4, "little"), modulus, [a.shape for a in vec])
        masks.append(mask)
        vec = parameters_mod(parameters_addition(vec, mask), modulus)
        total = vec if total is None else parameters_addition(total, vec)
    total = parameters_mod(total, modulus)
    for mask in masks:
        total = parameters_subtraction(total, mask)
    q_total, recon = factor_extract(parameters_mod(total, modulus))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = target / q_total
        (vec,) = dequantize(recon, clip, target)
        vec += -(len(updates) - 1) * clip
        vec *= inv
    return vec


def worst_case_updates(n: int, d: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Coordinate 0 at +C on every device (every device adds 2^bits to it), the rest small and random."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.uniform(-0.01, 0.01, d)
        u[0] = C
        out.append(u)
    return out


def test_22_bits_wraps_from_1024_devices_and_the_plan_refuses_exactly_those():
    bits = 22
    target = 2**bits
    assert plan(1023, bits, C).max_devices == 1023
    for n in (1024, 1025):
        with pytest.raises(SecAggRangeError):
            plan(n, bits, C)
        updates = worst_case_updates(n)
        secure_sum = flower_secure_mean(updates, C, target) * n  # how avrec reads the workflow's mean
        true_sum = np.sum(updates, axis=0)
        # The factor sum n * 2^22 wraps mod 2^32 (to 0 at 1,024: the mean divides by zero).
        assert not np.allclose(secure_sum, true_sum, atol=1.0), (n, secure_sum[:2], true_sum[:2])
    # 1,023 devices: the largest accepted; the same worst case comes back right, within the bound.
    p = plan(1023, bits, C)
    updates = worst_case_updates(1023)
    secure_sum = flower_secure_mean(updates, C, target) * 1023
    error = np.linalg.norm(secure_sum - np.sum(updates, axis=0))
    assert error <= rounding_bound(p, updates[0].size, 1023), error
    assert abs(secure_sum[0] - 1023 * C) < 1023 * p.step


def test_a_wrapped_factor_multiplies_the_round_by_n():
    # Near-zero updates summing to a small value: at 1,025 devices the factor wraps to 2^22, so the
    # "mean" comes back multiplied by 1,025 (the earlier report: a true sum of 0.062 read as 63.6).
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-1e-4, 1e-4, 4) for _ in range(1025)]
    updates[0][0] += 0.062 - sum(u[0] for u in updates)
    secure_sum = flower_secure_mean(updates, C, 2**22) * 1025
    # Flower's stochastic rounding (unseeded) moves the sum by less than one level per device, and the
    # wrapped factor multiplies that by 1,025 too: 1025 * 1025 * 2C / 2^22, about 0.5, far below 63.5.
    rounding = 1025 * 1025 * 2 * C / 2**22
    assert abs(secure_sum[0] - 0.062 * 1025) < rounding and abs(np.sum(updates, axis=0)[0] - 0.062) < 1e-9


@pytest.mark.parametrize("bits", [8, 16, 22, 26])
def test_plan_boundary_is_devices_times_levels_below_the_modulus(bits):
    n_max = (2**32 - 1) // 2**bits
    assert plan(n_max, bits, C).max_devices == n_max
    assert n_max * 2**bits < 2**32 <= (n_max + 1) * 2**bits
    with pytest.raises(SecAggRangeError):
        plan(n_max + 1, bits, C)
    # At 26 bits (the config's maximum) the boundary is small enough to run through Flower's arithmetic.
    if bits == 26:
        ok = worst_case_updates(n_max, seed=2)
        assert abs(flower_secure_mean(ok, C, 2**bits)[0] - C) < 1e-6
        bad = worst_case_updates(n_max + 1, seed=2)
        assert not abs(flower_secure_mean(bad, C, 2**bits)[0] - C) < 1e-3


def test_error_message_names_the_values_and_the_fix():
    with pytest.raises(SecAggRangeError) as info:
        plan(1025, 22, C)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("1,025 devices", "2^22", "2^32", "at most 1,023 devices", "secagg-quantization-bits <= 21"):
        assert part in msg, (part, msg)
    assert isinstance(info.value, ValueError)
    with pytest.raises(SecAggRangeError, match="1,024 devices x 2\\^22"):
        plan(1024, 22, C)


def test_rounding_bound_holds_through_flowers_quantize_dequantize():
    rng = np.random.default_rng(3)
    n, d = 40, 500
    for bits in (8, 12, 22):
        p = plan(n, bits, C)
        updates = []
        for _ in range(n):  # clipped to L2 norm C, as the devices send them
            u = rng.normal(size=d)
            updates.append(u * min(1.0, C / np.linalg.norm(u)) * rng.uniform(0.5, 1.0))
        rounded = [dequantize(quantize([u], C, p.quantization_range), C, p.quantization_range)[0] for u in updates]
        per_device = max(np.abs(r - u).max() for r, u in zip(rounded, updates))
        assert per_device < p.step  # one level, per coordinate, per device
        assert max(np.linalg.norm(r) for r in rounded) <= effective_sensitivity(p, d)
        secure_sum = flower_secure_mean(updates, C, p.quantization_range) * n
        error = np.linalg.norm(secure_sum - np.sum(updates, axis=0))
        assert error <= rounding_bound(p, d, n), (bits, error, rounding_bound(p, d, n))
        if bits == 8:  # coarse enough to see: the error is real, and is not below one device's worth
            assert error > p.step
    # The rounded update of a device clipped to exactly C does exceed C: the inflation is needed.
    p = plan(1, 8, C)
    u = rng.normal(size=d)
    u *= C / np.linalg.norm(u)
    norms = [np.linalg.norm(dequantize(quantize([u], C, p.quantization_range), C, p.quantization_range)[0])
             for _ in range(20)]
    assert max(norms) > C and max(norms) <= effective_sensitivity(p, d)


def test_effective_noise_multiplier_is_sigma_c_over_the_inflated_sensitivity():
    p = plan(5, 22, 2.0)
    d = 10_000
    step = 2 * 2.0 / 2**22
    assert p.step == step
    assert effective_sensitivity(p, d) == pytest.approx(2.0 + math.sqrt(d) * step)
    assert effective_noise_multiplier(1.0, p, d) == pytest.approx(2.0 / (2.0 + 100 * step))
    assert effective_noise_multiplier(1.0, p, d) < 1.0
    assert rounding_bound(p, d, 5) == pytest.approx(100 * 5 * step)


class FakeProxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


class FakeManager:
    """A ClientManager with `n` connected devices (FedAvg.configure_fit needs only these two calls)."""

    def __init__(self, n: int) -> None:
        self.proxies = [FakeProxy(str(i)) for i in range(n)]

    def num_available(self) -> int:
        return len(self.proxies)

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion=None) -> list:
        return self.proxies[:num_clients]


def test_server_refuses_a_round_that_can_wrap_and_records_the_plan(tmp_path):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from server.secagg import SecAggFedAvg
    from shared.config import load_config

    cfg = load_config(overrides={"secure-aggregation": True, "dp": "user", "trust-model": "central", "min-clients": 2,
                                 "secagg-quantization-bits": 22, "out": str(tmp_path)})
    initial = {"w": torch.zeros(30, 10), "b": torch.zeros(10)}
    strategy = SecAggFedAvg(cfg, initial, tmp_path)
    params = ndarrays_to_parameters([v.numpy() for v in initial.values()])
    assert len(strategy.configure_fit(1, params, FakeManager(1023))) == 1023
    assert strategy.plan.devices == 1023 and not strategy.refused
    # The accounted noise multiplier is sigma * C over the rounded update's sensitivity.
    d = 310
    assert strategy.mechanism.noise_multiplier == pytest.approx(
        cfg.user_noise_multiplier * cfg.user_clip_norm / (cfg.user_clip_norm + math.sqrt(d) * 2 * cfg.user_clip_norm / 2**22))
    # The round's ledger entry: the accounted (effective) noise multiplier, the configured one and the plan.
    mean = [np.full((30, 10), 0.01, dtype=np.float32), np.zeros(10, dtype=np.float32)]
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), 1, {})
    strategy.aggregate_fit(1, [(FakeProxy(str(i)), fit) for i in range(3)], [])
    (entry,) = strategy.ledger.entries
    assert entry.noise_multiplier == strategy.mechanism.noise_multiplier < cfg.user_noise_multiplier
    assert entry.details["configured_noise_multiplier"] == cfg.user_noise_multiplier
    sec = entry.details["secagg"]
    assert (sec["quantization_bits"], sec["modulus"], sec["clip_range"], sec["dimension"]) == (22, 2**32, cfg.user_clip_norm, d)
    assert sec["max_devices"] == 1023 and sec["planned_devices"] == 1023
    assert sec["rounding_bound_l2"] == pytest.approx(math.sqrt(d) * 3 * 2 * cfg.user_clip_norm / 2**22)
    assert sec["sensitivity"] == pytest.approx(cfg.user_noise_multiplier * cfg.user_clip_norm / entry.noise_multiplier)
    assert strategy.configure_fit(2, params, FakeManager(1025)) == []
    assert strategy.refused and "1,025 devices x 2^22" in strategy.recorder.stop_reason
    assert "round 2" in strategy.recorder.stop_reason
    assert strategy.configure_fit(3, params, FakeManager(5)) == []  # a refused run stays stopped
    assert strategy.recorder.finish(cfg)["stop_reason"].startswith("SecAgg+ round 2 refused")
