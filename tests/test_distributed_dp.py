"""Tests of the distributed discrete Gaussian (shared/privacy/distributed_dp.py).

Known-answer values for the accountant were produced by a scratch re-implementation (outside this
repository) of google-research/federated distributed_dp/accounting_utils.py at commit 5e27a86
(``heuristic_scale_factor`` for gamma, ``ddgauss_epsilon`` -> ``compute_rdp_dgaussian`` /
``_compute_rdp_subsampled`` / ``rounded_l2_norm_bound`` / ``rounded_l1_norm_bound``, and
tensorflow_privacy's ``get_privacy_spent`` conversion), with TFF's local std = noise_multiplier * C /
sqrt(n), k = 4, beta = exp(-0.5), RDP orders 2..128 and 256.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import linalg, stats

from shared.privacy import distributed_dp as ddp
from shared.privacy.accounting import SampledGaussian, epsilon

DELTA = 1e-5


def test_module_under_test_is_this_checkout():
    import pathlib

    here = pathlib.Path(__file__).resolve().parents[1]
    assert pathlib.Path(ddp.__file__).resolve().is_relative_to(here)


# --------------------------------------------------------------------------------------------------
# sampler


def _exact_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """P(x) ~ exp(-x^2 / (2 sigma^2)) over `support`, normalised over a support wide enough for the
    mass outside to be < 1e-30."""
    wide = np.arange(-int(12 * sigma) - 12, int(12 * sigma) + 13)
    z = np.exp(-(wide.astype(float) ** 2) / (2 * sigma**2)).sum()
    return np.exp(-(support.astype(float) ** 2) / (2 * sigma**2)) / z


def _exact_var(sigma: float) -> float:
    x = np.arange(-int(12 * sigma) - 12, int(12 * sigma) + 13)
    return float(np.sum(_exact_pmf(sigma, x) * x.astype(float) ** 2))


@pytest.mark.parametrize("sigma", [0.5, 3.0, 100.0])
def test_sampler_mean_and_variance(sigma):
    n = 200_000
    x = ddp.sample_discrete_gaussian(sigma, n, np.random.default_rng(1))
    assert x.dtype == np.int64 and x.shape == (n,)
    var = _exact_var(sigma)
    if sigma >= 3:
        # for sigma >= 1 the discrete Gaussian's variance is sigma^2 to within ~1e-15 relative
        assert var == pytest.approx(sigma**2, rel=1e-9)
    else:
        # sigma = 0.5: exact variance 0.2150..., below sigma^2 (CKS20: Var <= sigma^2)
        assert var == pytest.approx(0.21501, abs=1e-4)
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    # standard error of the sample variance ~ var * sqrt(2 / n) (0.32%); allow 5 of them
    assert x.var() == pytest.approx(var, rel=5 * math.sqrt(2 / n) * 1.2)


def _chisquare_p(sample: np.ndarray, sigma: float) -> float:
    vals, counts = np.unique(sample, return_counts=True)
    k = int(max(abs(vals.min()), vals.max()))
    support = np.arange(-k, k + 1)
    expected = _exact_pmf(sigma, support) * sample.size
    observed = np.zeros(support.size)
    observed[vals + k] = counts
    # merge the tails into the outermost bins with expected count >= 5
    keep = np.flatnonzero(expected >= 5)
    lo, hi = keep[0], keep[-1]
    obs = observed[lo : hi + 1].copy()
    exp = expected[lo : hi + 1].copy()
    obs[0] += observed[:lo].sum()
    obs[-1] += observed[hi + 1 :].sum()
    exp[0] += _exact_pmf(sigma, np.arange(-k - 200, support[lo])).sum() * sample.size
    exp[-1] += _exact_pmf(sigma, np.arange(support[hi] + 1, k + 201)).sum() * sample.size
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.parametrize("sigma", [0.5, 1.7, 3.0, 7.3])
def test_sampler_pmf_matches_exact_discrete_gaussian(sigma):
    x = ddp.sample_discrete_gaussian(sigma, 200_000, np.random.default_rng(2))
    assert _chisquare_p(x, sigma) > 1e-3
    # the same test has power: a 5% wider discrete Gaussian is rejected outright
    assert _chisquare_p(x, 1.05 * sigma) < 1e-6


def test_sampler_edge_cases():
    rng = np.random.default_rng(3)
    assert np.array_equal(ddp.sample_discrete_gaussian(0.0, 5, rng), np.zeros(5, dtype=np.int64))
    assert ddp.sample_discrete_gaussian(2.0, 0, rng).shape == (0,)
    x = ddp.sample_discrete_gaussian(2.0, 10_000, rng)
    assert np.all(x == x.astype(np.int64)) and (x < 0).any() and (x > 0).any()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma"):
            ddp.sample_discrete_gaussian(bad, 3, rng)
    with pytest.raises(ValueError, match="size"):
        ddp.sample_discrete_gaussian(1.0, -1, rng)


# --------------------------------------------------------------------------------------------------
# rotation


@pytest.mark.parametrize("D", [1, 2, 8, 32, 64, 128])
def test_fwht_is_the_normalised_sylvester_hadamard(D):
    x = np.random.default_rng(D).normal(size=D)
    assert np.allclose(ddp._fwht(x), linalg.hadamard(D) @ x / math.sqrt(D), atol=1e-12)


def test_rotation_is_orthogonal_and_inverted_exactly():
    D = 64
    R = np.stack([ddp._rotate(e, 11) for e in np.eye(D)], axis=1)  # columns = images of e_i
    assert np.allclose(R.T @ R, np.eye(D), atol=1e-12)
    assert np.allclose(np.abs(R), 1 / math.sqrt(D), atol=1e-12)  # a Hadamard rotation spreads every e_i
    R2 = np.stack([ddp._rotate(e, 12) for e in np.eye(D)], axis=1)
    assert not np.allclose(R, R2)  # the public seed matters
    x = np.random.default_rng(0).normal(size=4096)
    assert np.allclose(ddp._unrotate(ddp._rotate(x, 5), 5), x, atol=1e-12)
    # the signs depend only on (seed, D): identical on every call (devices and server agree)
    assert np.array_equal(ddp._signs.__wrapped__(5, 4096), ddp._signs.__wrapped__(5, 4096))


def test_decode_inverts_the_rotation_of_an_integer_sum_exactly():
    plan = ddp.plan_ddg(1.0, 0.0, 10, 1000, 16)
    k = np.random.default_rng(4).integers(-3000, 3000, size=plan.padded_dimension)
    out = ddp.decode(np.bitwise_and(k, plan.modulus - 1), plan, rotation_seed=9)
    assert out.shape == (1000,)
    full = ddp._unrotate(k.astype(float), 9) * plan.gamma  # decode before the crop
    assert np.allclose(full[:1000], out, atol=1e-12)
    assert np.allclose(ddp._rotate(full / plan.gamma, 9), k, atol=1e-8)  # rotating back gives k


# --------------------------------------------------------------------------------------------------
# encode / modular_sum / decode


def _updates(n: int, d: int, seed: int, norms: tuple[float, float]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, d))
    u *= (rng.uniform(*norms, size=n) / np.linalg.norm(u, axis=1))[:, None]
    return u


def _clipped(u: np.ndarray, c: float) -> np.ndarray:
    return u * np.minimum(1.0, c / np.linalg.norm(u, axis=1))[:, None]


def test_noiseless_sum_is_exact_up_to_rounding():
    n, d, c = 30, 1000, 0.5
    plan = ddp.plan_ddg(c, 0.0, n, d, 16)
    assert plan.local_stddev == 0.0
    u = _updates(n, d, 5, (0.2, 1.5))  # about half exceed the clip norm
    rng = np.random.default_rng(6)
    total = ddp.modular_sum((ddp.encode(x, plan, 3, rng) for x in u), plan.bits)
    err = ddp.decode(total, plan, 3) - _clipped(u, c).sum(axis=0)
    # Bound: each device's rounding moves each rotated integer coordinate by < 1, so the rotated
    # error has norm < n sqrt(D) integer steps; rotation is orthogonal and cropping only shrinks it.
    hard = n * math.sqrt(plan.padded_dimension) * plan.gamma
    # Typical: randomised rounding errors are independent, mean ~0, variance f(1-f) <= 1/4 per
    # coordinate, so E||err||^2 <= gamma^2 n D / 4 (measured: ~0.8 of that root, as E f(1-f) = 1/6).
    typical = 1.1 * plan.gamma * math.sqrt(n * plan.padded_dimension / 4)
    assert np.linalg.norm(err) < typical < hard
    # clipping happened: the unclipped sum is far away
    assert np.linalg.norm(ddp.decode(total, plan, 3) - u.sum(axis=0)) > 100 * typical


def test_aligned_updates_fit_the_modulus():
    # worst case for the modular range: every device sends the same update of norm C (the n^2 term)
    n, d = 50, 512
    plan = ddp.plan_ddg(1.0, 1.0, n, d, 12)
    x = _updates(1, d, 7, (1.0, 1.0))[0]
    rng = np.random.default_rng(8)
    total = ddp.modular_sum([ddp.encode(x, plan, 1, rng) for _ in range(n)], plan.bits)
    err = ddp.decode(total, plan, 1) - n * x
    noise_sd = math.sqrt(n) * plan.local_stddev * plan.gamma
    assert 0.8 * noise_sd < np.sqrt(np.mean(err**2)) < 1.2 * noise_sd  # no wrap: the error is the noise


def test_rounded_norm_is_enforced_at_the_accountants_bound():
    c, d = 1.0, 300
    for beta in (math.exp(-0.5), 0.0):
        plan = ddp.plan_ddg(c, 0.0, 1000, d, 16, beta=beta)
        assert plan.rounded_l2_bound == pytest.approx(
            ddp.rounded_l2_norm_bound(c / plan.gamma, beta, plan.padded_dimension), rel=1e-15
        )
        x = _updates(1, d, 9, (c, c))[0]  # norm exactly C: the worst case
        rng = np.random.default_rng(10)
        half = 1 << (plan.bits - 1)
        for _ in range(50):
            y = ddp.encode(x, plan, 2, rng)
            r = np.where(y >= half, y - plan.modulus, y).astype(float)  # noiseless: the rounded vector
            assert np.linalg.norm(r) <= plan.rounded_l2_bound
    # beta = 0 is the unconditional bound C/gamma + sqrt(D); beta > 0 is tighter
    assert ddp.rounded_l2_norm_bound(100.0, 0.0, 64) == 108.0
    assert ddp.rounded_l2_norm_bound(100.0, math.exp(-0.5), 64) == pytest.approx(
        math.sqrt(100**2 + 16 + 1.0 * (100 + 4)), rel=1e-12
    )


def test_noise_variance_and_dropouts():
    n, d = 20, 8192
    plan = ddp.plan_ddg(1.0, 1.0, n, d, 16)
    assert plan.local_stddev == pytest.approx(1.0 / (plan.gamma * math.sqrt(n)), rel=1e-12)
    u = _updates(n, d, 11, (0.1, 0.9))
    rng = np.random.default_rng(12)
    enc = [ddp.encode(x, plan, 4, rng) for x in u]
    for m in (n, 12):  # all devices, then only 12 survivors: less noise
        err = ddp.decode(ddp.modular_sum(enc[:m], plan.bits), plan, 4) - u[:m].sum(axis=0)
        want = m * plan.local_stddev**2 * plan.gamma**2  # discrete Gaussian variance = sigma^2 here
        assert abs(err.mean()) < 5 * math.sqrt(want / d)
        assert err.var() == pytest.approx(want, rel=5 * math.sqrt(2 / d))
    # with all n shares the noise is the central noise a trusted server would add: std = z C
    assert n * plan.local_stddev**2 * plan.gamma**2 == pytest.approx(1.0, rel=1e-12)


def test_too_few_bits_refused_or_caught():
    with pytest.raises(ValueError, match="too few"):
        ddp.plan_ddg(1.0, 1.0, 50, 1000, 6, k_stddevs=10.0)  # 2**12 < 50 * 10**2
    with pytest.raises(ValueError, match="log2"):
        ddp.plan_ddg(1.0, 1.0, 1000, 1000, 9)  # 2**9 < 1000 devices
    plan = ddp.plan_ddg(1.0, 1.0, 100, 1000, 16)
    x = _updates(1, 1000, 13, (0.5, 0.5))[0]
    rng = np.random.default_rng(14)
    with pytest.raises(ValueError, match="modular range"):
        ddp.encode(x, dataclasses.replace(plan, bits=8), 0, rng)  # one device's noise alone wraps
    # Fewer bits than planned: each device's vector fits, but the sum of 100 aligned updates wraps
    # and decoding is garbage; with the planned bits the same sum decodes to within rounding.
    plan = ddp.plan_ddg(1.0, 0.0, 100, 1000, 16)
    narrow = dataclasses.replace(plan, bits=13)
    truth = 100 * x / np.linalg.norm(x)
    good = ddp.decode(ddp.modular_sum([ddp.encode(x / 0.5, plan, 0, rng) for _ in range(100)], 16), plan, 0)
    bad = ddp.decode(ddp.modular_sum([ddp.encode(x / 0.5, narrow, 0, rng) for _ in range(100)], 13), narrow, 0)
    assert np.linalg.norm(good - truth) < 100 * math.sqrt(plan.padded_dimension) * plan.gamma  # hard bound
    assert np.linalg.norm(bad - truth) > 0.5 * np.linalg.norm(truth)


def test_input_validation():
    plan = ddp.plan_ddg(1.0, 1.0, 10, 100, 12)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="length 100"):
        ddp.encode(np.zeros(99), plan, 0, rng)
    with pytest.raises(ValueError, match="finite"):
        ddp.encode(np.full(100, np.nan), plan, 0, rng)
    with pytest.raises(ValueError, match="rotation_seed"):
        ddp.encode(np.zeros(100), plan, -1, rng)
    with pytest.raises(ValueError, match="clip"):
        ddp.plan_ddg(0.0, 1.0, 10, 100, 12)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ddp.plan_ddg(1.0, -1.0, 10, 100, 12)
    with pytest.raises(ValueError, match="bits"):
        ddp.plan_ddg(1.0, 1.0, 10, 100, 60)
    with pytest.raises(ValueError, match="beta"):
        ddp.plan_ddg(1.0, 1.0, 10, 100, 12, beta=1.0)
    with pytest.raises(ValueError, match="at least one"):
        ddp.modular_sum([], 12)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*12\)"):
        ddp.decode(np.full(plan.padded_dimension, 4096), plan, 0)
    with pytest.raises(ValueError, match="integers"):
        ddp.modular_sum([np.zeros(4)], 12)
    e = ddp.encode(np.ones(100) * 0.05, plan, 0, rng)
    assert e.dtype == np.int64 and e.shape == (128,) and e.min() >= 0 and e.max() < 4096


def test_details_are_json_and_complete():
    plan = ddp.plan_ddg(0.7, 1.1, 100, 3000, 14)
    det = json.loads(json.dumps(plan.details()))
    for f in dataclasses.fields(plan):
        assert det[f.name] == getattr(plan, f.name)
    assert det["padded_dimension"] == 4096 and det["modulus"] == 2**14
    assert det["central_stddev"] == pytest.approx(0.77)
    assert det["mechanism"] == "distributed_discrete_gaussian"


# --------------------------------------------------------------------------------------------------
# accountant

# (n, bits, sample_rate, rounds, survivors, noise_multiplier, d) -> (gamma, local std in integer
# units, epsilon at delta 1e-5) from the reference formulas (see the module docstring); C = 1.
REFERENCE = [
    ((100, 16, 1.0, 20, 100, 1.0, 2**16), (0.00013105305927917302, 763.0497185645786, 30.134924005447292)),
    ((100, 18, 1.0, 20, 100, 1.0, 2**16), (3.2763259098573594e-05, 3052.1994072425377, 30.12764085893422)),
    ((1000, 16, 1.0, 20, 1000, 1.0, 2**16), (0.0004922151350624445, 64.24584363435308, 30.216484546659895)),
    ((1000, 18, 1.0, 20, 1000, 1.0, 2**16), (0.0001230535688851859, 256.983823290726, 30.134092729020526)),
    # few bits: the tau term and the rounding inflation matter
    ((1000, 12, 1.0, 20, 1000, 1.0, 2**16), (0.007879185476429913, 4.013457570745268, 50.786030433438974)),
    ((100, 10, 1.0, 20, 100, 1.0, 2**16), (0.008393800638044232, 11.913554337561697, 53.561859949914)),
    ((100, 8, 1.0, 20, 100, 0.5, 2**10), (0.10012817111408084, 0.49935996476988076, 201275.80074974764)),
    # Poisson subsampling (Zhu-Wang Theorem 5, min with the unsampled bound)
    ((1000, 16, 0.01, 1000, 1000, 1.0, 2**16), (0.0004922151350624445, 64.24584363435308, 2.463219745282169)),
    ((100, 12, 0.05, 200, 100, 1.0, 2**16), (0.0020969485505810234, 47.68834217334133, 7.079961640482072)),
    # 600 of 1000 devices survive: ddgauss_epsilon with num_clients = 600, same local std
    ((1000, 16, 1.0, 20, 600, 1.0, 2**16), (0.0004922151350624445, 64.24584363435308, 43.60972017519959)),
]


@pytest.mark.parametrize("args,want", REFERENCE)
def test_known_answers_from_reference_formulas(args, want):
    n, bits, q, rounds, survivors, z, d = args
    gamma, local, eps = want
    plan = ddp.plan_ddg(1.0, z, n, d, bits)
    assert plan.gamma == pytest.approx(gamma, rel=1e-12)
    assert plan.local_stddev == pytest.approx(local, rel=1e-12)
    assert ddp.ddg_epsilon([(plan, survivors, q)] * rounds, DELTA) == pytest.approx(eps, rel=1e-9)


def test_rdp_matches_gaussian_in_the_continuous_limit():
    plan = ddp.plan_ddg(1.0, 1.0, 100, 2**16, 40)  # gamma ~ 1e-11: no rounding inflation, tau = 0
    assert plan.rounded_l2_bound * plan.gamma == pytest.approx(1.0, abs=1e-10)
    orders = np.array([1.5, 2.0, 10.0, 64.0])
    assert np.allclose(ddp.ddg_rdp(plan, 100, orders), orders / 2, rtol=1e-9)  # alpha / (2 z^2)
    gauss = epsilon([SampledGaussian(1.0, 1.0, 20)], DELTA, accountant="rdp-fast")
    assert ddp.ddg_epsilon([(plan, 100, 1.0)] * 20, DELTA) == pytest.approx(gauss, rel=1e-9)
    # fewer bits -> coarser grid -> larger epsilon, approaching the Gaussian from above
    eps_by_bits = [
        ddp.ddg_epsilon([(ddp.plan_ddg(1.0, 1.0, 100, 2**16, b), 100, 1.0)] * 20, DELTA) for b in (10, 12, 16, 40)
    ]
    assert all(a > b for a, b in zip(eps_by_bits, eps_by_bits[1:]))
    assert eps_by_bits[-1] >= gauss * (1 - 1e-12)
    # Poisson subsampled: Zhu-Wang's general bound is an upper bound, looser than the sampled
    # Gaussian's tight RDP (about 16% here; measured, not a theorem)
    gauss_q = epsilon([SampledGaussian(1.0, 0.01, 1000)], DELTA, accountant="rdp-fast")
    ddg_q = ddp.ddg_epsilon([(plan, 100, 0.01)] * 1000, DELTA)
    assert gauss_q < ddg_q < 1.25 * gauss_q


def test_fewer_survivors_means_larger_epsilon():
    plan = ddp.plan_ddg(1.0, 1.0, 1000, 2**16, 16)
    for q, rounds in ((1.0, 20), (0.02, 500)):
        eps = [ddp.ddg_epsilon([(plan, m, q)] * rounds, DELTA) for m in (1000, 900, 600, 300)]
        assert all(a < b for a, b in zip(eps, eps[1:])), eps
    # mixed history: one round with dropouts costs more than one without
    full = ddp.ddg_epsilon([(plan, 1000, 1.0)] * 10, DELTA)
    mixed = ddp.ddg_epsilon([(plan, 1000, 1.0)] * 9 + [(plan, 500, 1.0)], DELTA)
    assert mixed > full
    with pytest.raises(ValueError, match="survivors"):
        ddp.ddg_epsilon([(plan, 1001, 1.0)], DELTA)
    with pytest.raises(ValueError, match="survivors"):
        ddp.ddg_rdp(plan, 0, [2.0])


def test_accountant_edge_cases():
    plan = ddp.plan_ddg(1.0, 1.0, 100, 1000, 14)
    assert ddp.ddg_epsilon([], DELTA) == 0.0
    assert ddp.ddg_epsilon([(ddp.plan_ddg(1.0, 0.0, 100, 1000, 14), 100, 1.0)], DELTA) == math.inf
    # composition adds RDP: two identical rounds = one round with twice the curve
    one = ddp.ddg_rdp(plan, 100, ddp.RDP_ORDERS)
    assert np.all(one > 0) and np.all(np.diff(one) > 0)
    with pytest.raises(ValueError, match="sample_rate"):
        ddp.ddg_epsilon([(plan, 100, 0.0)], DELTA)
    with pytest.raises(ValueError, match="sample_rate"):
        ddp.ddg_epsilon([(plan, 100, 1.5)], DELTA)
    with pytest.raises(ValueError, match="delta"):
        ddp.ddg_epsilon([(plan, 100, 1.0)], 0.0)
    with pytest.raises(ValueError, match="orders"):
        ddp.ddg_rdp(plan, 100, [1.0])
    # subsampling never hurts: min(Zhu-Wang, unsampled)
    assert ddp.ddg_epsilon([(plan, 100, 0.1)] * 50, DELTA) < ddp.ddg_epsilon([(plan, 100, 1.0)] * 50, DELTA)
