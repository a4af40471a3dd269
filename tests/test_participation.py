"""User-level accounting per client, and the cap on rounds per client with a minimum separation."""

import pytest

from server.app import schedule_allows
from shared.config import ConfigError, RunConfig
from shared.privacy.accounting import SampledGaussian as SG, epsilon_checked
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.participation import participation, schedule_problems, user_epsilon


def ledger(tmp_path, rounds):
    led = PrivacyLedger(tmp_path / "server-ledger.jsonl", "user")
    for r, chosen in rounds:
        led.append(round=r, mechanism="dp-fedavg", noise_multiplier=2.0, sample_rate=1.0, steps=1, clip_norm=1.0,
                   sampling="all-clients", amplification=False, neighbouring="add or remove one user",
                   details={"participants": chosen})
    return led


def test_a_user_is_charged_only_for_the_rounds_it_was_chosen_for(tmp_path):
    led = ledger(tmp_path, [(1, [1, 2]), (2, [1]), (3, [1, 3])])
    assert participation(led.entries) == {"1": 3, "2": 1, "3": 1}
    assert user_epsilon(led.entries, 1e-5).epsilon == epsilon_checked([SG(2.0, 1.0, 3)], 1e-5).epsilon


def test_cap_and_separation_are_enforced_and_checked(tmp_path):
    cfg = RunConfig(dp="user", max_rounds_per_client=2, min_round_separation=2)
    assert schedule_allows(cfg, 0, None, 1) and not schedule_allows(cfg, 1, 1, 2) and schedule_allows(cfg, 1, 1, 3)
    assert not schedule_allows(cfg, 2, 1, 5)
    led = ledger(tmp_path, [(1, [1]), (2, [1]), (3, [1])])
    problems = schedule_problems(led.entries, cap=2, separation=2)
    assert any("over the cap 2" in p for p in problems) and any("minimum separation 2" in p for p in problems)
    assert schedule_problems(led.entries, cap=0, separation=1) == []


def test_a_cap_with_amplified_sampling_is_refused():
    with pytest.raises(ConfigError, match="only where amplification is not claimed"):
        RunConfig(fraction_train=0.5, max_rounds_per_client=3)
