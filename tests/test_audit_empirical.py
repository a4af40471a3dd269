"""The one-run audit (Steinke, Nasr, Jagielski 2023) must refute the claimed epsilon when the noise is off
or cut to a tenth of its claimed value, and must not when the training is correct. Record level: gradient
canaries in a real Opacus DP-SGD run of avrec's model through `train_local`; user level: canary clients
through DP-FedAvg's `aggregate`."""

import math

import pytest

from functools import partial

from shared.privacy.empirical import epsilon_lower_bound, p_value, record_level, user_level

# A smaller device model than `avrec audit empirical` uses, to keep the tests fast (claimed epsilon 2.71 at
# delta 1e-5; with the noise cut tenfold, 1000 canaries gave lower bounds of 3.08-3.31 in three runs).
record_level = partial(record_level, embedding_dim=16, steps=104, sample_rate=1 / 13, noise_multiplier=1.5)


def test_the_bound_matches_the_binomial_test():
    # all of 1000 guesses right: the bound is the eps with q^1000 = 0.05 (delta 0), i.e. about 5.8 (NOTES 4)
    q = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance accuracy refutes nothing
    # delta only weakens the test: the p-value grows with delta
    assert p_value(1000, 100, 90, 1.0, 1e-3) > p_value(1000, 100, 90, 1.0, 0.0)
    assert epsilon_lower_bound(1000, 100, 90, 1e-3) < epsilon_lower_bound(1000, 100, 90, 0.0)


@pytest.mark.parametrize("audit", [record_level, user_level], ids=["record", "user"])
def test_correct_training_is_not_flagged(audit):
    r = audit(noise_fraction=1.0, seed=1)
    assert r["epsilon_lower_bound"] <= r["claimed_epsilon"], r


@pytest.mark.parametrize("fraction", [0.0, 0.1])
@pytest.mark.parametrize("audit", [record_level, user_level], ids=["record", "user"])
def test_missing_noise_is_flagged(audit, fraction):
    r = audit(noise_fraction=fraction, seed=2)
    assert r["epsilon_lower_bound"] > r["claimed_epsilon"], r
