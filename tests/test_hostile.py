"""Hostile clients: robust aggregation bounds what one update does, bad settings are refused, and a simulated
promotion attack through the real aggregation raises the target's exposure (a tiny planted run)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from server.aggregate import Robust, ServerOptimizer, aggregate, coordinatewise
from shared.config import ConfigError, RunConfig, load_config
from shared.data.synthetic import write_planted_dataset
from shared.updates import update_norm
from simulations.attack_table import honest_outcomes
from simulations.inprocess import run_inprocess
from simulations.simulate import simulate

REF = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}


def upd(x: float) -> dict:
    return {"a": torch.full((3,), x), "b": torch.full((2, 2), x)}


def test_a_norm_1e6_update_moves_the_model_by_at_most_the_bound_over_n():
    honest = [(f"c{i}", upd(0.0)) for i in range(9)]
    hostile = ("evil", {k: v * 1e6 / update_norm(upd(1.0)) for k, v in upd(1.0).items()})  # norm 1e6
    plain = aggregate([*honest, hostile], REF)
    assert update_norm(plain.delta) == pytest.approx(1e5, rel=1e-5)  # what it did before: 1e6 / 10
    bounded = aggregate([*honest, hostile], REF, robust=Robust("norm-bound", norm_bound=2.0))
    assert bounded.accepted == 10 and update_norm(bounded.delta) == pytest.approx(0.2, rel=1e-5)
    huge = [("huge1", upd(3e38)), ("huge2", upd(3e38))]  # finite, but the server's step makes the model infinite
    sgd = ServerOptimizer("sgd", 10.0)
    assert not torch.isfinite(sgd.step(REF, aggregate([*honest[2:], *huge], REF).delta)["a"]).all()
    safe = aggregate([*honest[2:], *huge], REF, robust=Robust("norm-bound", norm_bound=2.0)).delta
    assert update_norm(safe) <= 2 * 2.0 / 9 + 1e-6 and torch.isfinite(sgd.step(REF, safe)["a"]).all()


def test_trimmed_mean_and_median_ignore_an_outlier():
    updates = [(f"c{i}", upd(float(i))) for i in range(1, 10)] + [("evil", upd(1e6))]
    median = aggregate(updates, REF, robust=Robust("median"))
    assert torch.allclose(median.delta["a"], torch.full((3,), 5.5))  # the middle two of 1..9, 1e6
    trimmed = aggregate(updates, REF, robust=Robust("trimmed-mean", trim_fraction=0.1))  # cuts 1 and 1e6
    assert torch.allclose(trimmed.delta["b"], torch.full((2, 2), sum(range(2, 10)) / 8))
    # coordinate by coordinate, whoever sent the value; blocks of coordinates give the same result
    values = [torch.randn(70_000, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    assert torch.equal(coordinatewise("median", values, 0.0), torch.stack(values).double().median(dim=0).values)


@pytest.mark.parametrize("settings, message", [
    ({"robust-aggregation": "median"}, "under user-level DP"),  # the default dp = user: only the noised sum
    ({"dp": "none", "robust-aggregation": "mean"}, "expected one of none, norm-bound"),
    ({"dp": "none", "robust-aggregation": "trimmed-mean", "robust-trim-fraction": 0.5}, "robust-trim-fraction = 0.5"),
    ({"dp": "none", "robust-norm-bound": 0}, "robust-norm-bound = 0"),
    ({"dp": "none", "attack": "fake-users"}, "an attack needs 0 < attack-fraction"),
    ({"dp": "none", "attack-fraction": 0.05}, "attack = none needs 0"),
    ({"dp": "none", "attack": "fedrecattack", "attack-fraction": 0.05}, "attack-norm must say"),
    ({"dp": "none", "attack": "sybil", "attack-fraction": 0.05}, "attack = 'sybil'"),
])
def test_settings_that_make_no_sense_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)


def test_attacks_run_only_on_the_inprocess_engine():
    cfg = RunConfig(dp="none", attack="fake-users", attack_fraction=0.1)
    with pytest.raises(ConfigError, match="in-process engine only"):
        simulate(cfg, engine="flower")
    assert cfg.replace(robust_aggregation="norm-bound").accepted_norm == 10.0
    assert RunConfig().accepted_norm == RunConfig().user_clip_norm


def test_fedrecattack_through_the_real_aggregation_raises_the_target_s_exposure(tmp_path):
    data = write_planted_dataset(tmp_path / "planted", n_users=20, n_items=30, n_clusters=3,
                                 interactions_per_user=10, seed=0)
    base = {"dataset": str(data), "cache-dir": str(tmp_path / "cache"), "num-rounds": 3, "dp": "none",
            "eval-negatives": 9, "attack-target": 0}
    exposure = {}
    for name, settings in {"clean": {}, "attacked": {"attack": "fedrecattack", "attack-fraction": 0.1,
                                                      "attack-norm": 5.0}}.items():
        cfg = load_config(None, {**base, **settings, "out": str(tmp_path / name), "state-dir": str(tmp_path / name / "d")})
        run_inprocess(cfg, 20, str(data), threads=1)
        rounds = (tmp_path / name / "rounds.jsonl").read_text().splitlines()
        assert f'"clients_aggregated": {22 if settings else 20}' in rounds[-1]  # the 2 malicious clients took part
        outcomes = honest_outcomes(cfg, load_file(tmp_path / name / "global_model.safetensors"), 0)
        exposure[name] = np.mean([o["exposed"] for o in outcomes.values() if o["exposed"] is not None])
    assert exposure["attacked"] >= exposure["clean"] + 0.3, exposure


def test_under_trust_model_secure_a_share_outside_the_protocol_moves_the_sum_by_a_bounded_amount():
    from server.secure_sum import SecureRound
    from shared.secure import noised_share, sum_bound

    cfg = RunConfig(dp="user", trust_model="secure", secure_bits=16)
    reference = {"w": torch.zeros(200)}
    rnd = SecureRound.plan_round(cfg, 8, reference)
    honest = [(f"d{i}", noised_share({"w": torch.full((200,), 0.05)}, cfg, 8, rnd.rotation_seed)) for i in range(8)]
    clean = rnd.aggregate(honest, reference)
    assert clean.accepted == 8 and not clean.notes  # honest shares never reach the bound
    evil = torch.randint(0, 2**16, honest[0][1].shape, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    attacked = rnd.aggregate([*honest[1:], ("evil", evil)], reference)
    bound = sum_bound(rnd.plan, 8) / rnd.denominator
    unbounded = rnd.plan.gamma * 2**15 * rnd.plan.padded_dimension**0.5 / rnd.denominator
    assert "outside the protocol" in attacked.notes[0] and update_norm(attacked.delta) <= bound * (1 + 1e-6)
    assert bound < unbounded / 2  # what the modulus alone allows
