"""The privacy-utility frontier: noise calibrated to each target epsilon through the run's own accountant,
every reported epsilon read back from the run's ledger (never above the target), and its three outputs."""

import json

import pytest

from shared.config import RunConfig, load_config
from shared.data.synthetic import write_planted_dataset
from shared.privacy.accounting import SampledGaussian, epsilon
from simulations.frontier import frontier, record_noise, user_noise


@pytest.mark.parametrize("trust", ["central", "secure"])
def test_user_noise_reaches_the_target_and_no_further(trust):
    cfg = RunConfig(dp="user", trust_model=trust, num_rounds=20)
    loose, tight = user_noise(cfg, 8.0, 943, 100_000), user_noise(cfg, 1.0, 943, 100_000)
    assert tight > 5 * loose > 0  # epsilon 1 needs far more noise than epsilon 8
    if trust == "central":
        reached = epsilon([SampledGaussian(loose, 1.0, 1)] * 20, cfg.user_delta, accountant="rdp-fast")
        assert 7.9 < reached <= 8.0


def test_record_noise_keeps_the_history_ratio():
    cfg = RunConfig(dp="record", num_rounds=5)
    sigma, history = record_noise(cfg, 4.0)
    assert history == pytest.approx(sigma * cfg.history_noise_multiplier / cfg.noise_multiplier)
    events = [SampledGaussian(history, 1.0, 1)] + [SampledGaussian(sigma, cfg.record_sample_rate, cfg.record_steps)] * 5
    assert 3.9 < epsilon(events, cfg.delta, accountant="rdp-fast") <= 4.0


def test_a_small_frontier_reads_each_epsilon_from_its_run(tmp_path):
    data = write_planted_dataset(tmp_path / "data", n_users=16, n_items=60, n_clusters=3, interactions_per_user=15, seed=5)
    base = load_config(overrides={"dataset": str(data), "cache-dir": str(tmp_path / "cache"), "num-rounds": 2,
                                  "eval-negatives": 29, "modalities": "text"})
    report = frontier(base, tmp_path / "f", [2.0, 8.0], ["user/central"], log=lambda *_: None)
    points = report["points"]["user/central"]
    for p in points:
        ledger = [json.loads(line) for line in open(f"{p['run']}/server-ledger.jsonl")]
        assert len(ledger) == p["rounds"] == 2 and 0 < p["epsilon"] <= p["target"]
    assert points[0]["user-noise-multiplier"] > points[1]["user-noise-multiplier"]
    assert {p["epsilon"] for p in report["dp_popularity"]["user"]} == {2.0, 8.0}
    for name in ("frontier.json", "frontier.md", "frontier.png"):
        assert (tmp_path / "f" / name).stat().st_size > 0
    assert "| user/central | 8 |" in (tmp_path / "f" / "frontier.md").read_text()
