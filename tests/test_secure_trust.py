"""Trust model `secure`: devices add discrete Gaussian shares, the server sees only their modular sum.

Unit level: the shares of many devices, summed modulo 2^bits and decoded, give the mean of their clipped
updates (within the rounding bound, plus the noise the devices added); too few shares are not decoded.
End to end: a real Flower simulation under `trust-model = secure` whose ledger, accounting, verification
and report say what ran."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from server.secure_sum import SecureRound
from shared.config import RunConfig, load_config
from shared.secure import noised_share
from shared.updates import clip_update

REFERENCE = {"a.weight": torch.zeros(40, 8), "b.bias": torch.zeros(17)}


def updates(n: int, clip: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [clip_update({k: torch.randn(v.shape, generator=g) for k, v in REFERENCE.items()}, clip) for _ in range(n)]


def secure_mean(cfg: RunConfig, deltas, expected: int, drop: int = 0):
    plan = SecureRound.plan_round(cfg, expected, REFERENCE)
    shares = [(f"device {i}", noised_share(d, cfg, plan.expected, plan.rotation_seed)) for i, d in enumerate(deltas)]
    return plan, plan.aggregate(shares[: len(shares) - drop], REFERENCE)


def test_the_decoded_sum_is_the_mean_of_the_clipped_updates():
    cfg = RunConfig(dp="user", trust_model="secure", user_noise_multiplier=1e-3, user_clip_norm=1.0, secure_bits=20)
    deltas = updates(30, 1.0)
    plan, result = secure_mean(cfg, deltas, 30)
    assert result.accepted == 30 and not result.rejected
    for k in REFERENCE:
        true = torch.stack([d[k] for d in deltas]).mean(0)
        assert torch.allclose(result.delta[k].float(), true, atol=2e-3), (k, float((result.delta[k] - true).abs().max()))


def test_the_sum_carries_the_noise_the_plan_promises():
    sigma, n = 0.5, 20
    cfg = RunConfig(dp="user", trust_model="secure", user_noise_multiplier=sigma, user_clip_norm=1.0, secure_bits=20)
    zeros = [{k: torch.zeros_like(v) for k, v in REFERENCE.items()} for _ in range(n)]
    draws = []
    for _ in range(20):
        _, result = secure_mean(cfg, zeros, n)
        draws.append(torch.cat([result.delta[k].reshape(-1) for k in sorted(REFERENCE)]) * n)  # the noisy sum
    std = float(torch.stack(draws).std())
    assert std == pytest.approx(sigma * cfg.user_clip_norm, rel=0.1), std


def test_too_few_shares_are_not_decoded():
    cfg = RunConfig(dp="user", trust_model="secure", secure_min_fraction=0.8)
    plan, result = secure_mean(cfg, updates(10, 1.0), 10, drop=3)
    assert result.delta is None and "fewer than secure-min-fraction" in result.rejected[-1]
    plan, result = secure_mean(cfg, updates(10, 1.0), 10, drop=2)
    assert result.accepted == 8


def test_a_malformed_share_is_rejected():
    cfg = RunConfig(dp="user", trust_model="secure", secure_min_fraction=0.5)
    plan = SecureRound.plan_round(cfg, 4, REFERENCE)
    good = [(f"d{i}", noised_share(d, cfg, 4, plan.rotation_seed)) for i, d in enumerate(updates(3, 1.0))]
    bad = ("evil", torch.full((plan.plan.padded_dimension,), 2**cfg.secure_bits, dtype=torch.int32))
    result = plan.aggregate([*good, bad], REFERENCE)
    assert result.accepted == 3 and "outside [0, 2^20)" in result.rejected[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from shared.data.synthetic import write_planted_dataset
    from simulations.simulate import simulate

    root = tmp_path_factory.mktemp("secure")
    data = write_planted_dataset(root / "planted", n_users=16, n_items=90, n_clusters=3, interactions_per_user=20, seed=0)
    cfg = load_config(overrides={
        "dataset": str(data), "out": str(root / "run"), "cache-dir": str(root / "cache"), "num-rounds": 3,
        "eval-negatives": 49, "dp": "user", "trust-model": "secure", "user-noise-multiplier": 1.0,
        "user-delta": 1e-3, "messages-in-flight": 4})
    return root / "run", simulate(cfg, log=lambda *_: None)


def test_a_secure_run_records_verifies_and_reports_what_ran(run):
    from shared.privacy.ledger import PrivacyLedger
    from shared.privacy.report import collect
    from shared.privacy.verify import verify_run

    out, summary = run
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients_aggregated"] for r in rounds] == [16, 16, 16]
    entries = PrivacyLedger(out / "server-ledger.jsonl", level="user").entries
    assert [e.mechanism for e in entries] == ["ddg-secure-sum"] * 3
    assert all(e.details["survivors"] == 16 and e.details["trust_model"] == "secure" for e in entries)
    eps = summary["privacy"]["user_level"]["epsilon"]
    assert 0 < eps < math.inf
    v = verify_run(out)
    assert v.ok, v.problems
    facts = collect(out)
    assert facts["threat_model"]["trust_model"] == "secure"
    assert "modular sum" in facts["threat_model"]["server_sees"]
    assert not facts["threat_model"]["secure_aggregation_ran"]  # Flower's SecAgg+ did not run

