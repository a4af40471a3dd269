"""Known-answer tests for shared.privacy.accounting.

Golden numbers: /work/shared/NOTES.md sections 3 and 4 (measured with opacus
1.6.0 and dp-accounting 0.6.0), Opacus's own RDP golden test, and the analytic
Gaussian mechanism (Balle & Wang 2018).
"""

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from shared.privacy import accounting
from shared.privacy.accounting import (
    AccountingError,
    EpsilonReport,
    SampledGaussian as SG,
    epsilon,
    epsilon_after,
    epsilon_checked,
    normalise,
    zcdp_rho,
)


# --------------------------------------------------------------- golden values


def test_notes_section4_golden_all_accountants():
    # NOTES 4: sigma=1.0, q=0.01, T=1000, delta=1e-5 -> RDP 2.101, PRV 1.838, PLD 1.829
    r = epsilon_checked([SG(1.0, 0.01, 1000)], 1e-5)
    assert isinstance(r, EpsilonReport)
    assert r.rdp == pytest.approx(2.101, abs=0.002)
    assert r.prv == pytest.approx(1.838, abs=0.005)
    assert r.pld == pytest.approx(1.829, abs=0.005)
    assert r.epsilon == r.pld
    assert r.delta == 1e-5
    assert "dp-accounting 0.6.0 PLD" in r.accountant and "opacus 1.6.0" in r.accountant


def test_opacus_rdp_golden():
    # Opacus's own test: sigma=1.5, q=0.04, 2250 steps (delta=1e-5) -> 7.329 (RDP)
    assert epsilon([SG(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.329, abs=0.002)


def test_notes_section3_user_level_poisson_amplification():
    # NOTES 3: z=1, 100 of 100000 clients, 2000 rounds: RDP 0.88, PLD ~0.26 (delta=1e-6).
    # NOTES' 0.26 was measured at vdi=1e-3, which over-states by ~0.01 (PLD at
    # vdi=5e-5 gives 0.2523); the finer adaptive grid here lands at ~0.253.
    ev = [SG(1.0, 100 / 100_000, 2000)]
    assert epsilon(ev, 1e-6, "rdp") == pytest.approx(0.882, abs=0.003)
    pld = epsilon(ev, 1e-6, "pld")
    assert pld == pytest.approx(0.26, abs=0.01)
    assert pld == pytest.approx(0.2523, abs=0.003)
    # and without amplification the same mechanism is worth vastly more epsilon
    assert epsilon([SG(1.0, 1.0, 2000)], 1e-6, "rdp") > 1000


# --------------------------------------------- agreement with the raw libraries


HET = [SG(1.0, 0.01, 120), SG(2.0, 0.05, 100), SG(0.8, 1.0, 2)]


def test_rdp_equals_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    assert tuple(RDPAccountant.DEFAULT_ALPHAS) == accounting.RDP_ORDERS
    acc = RDPAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in HET]
    assert epsilon(HET, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_pld_equals_dp_accounting_pld_accountant():
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    hist = normalise(HET)
    vdi = accounting._pld_vdi(hist, 1e-5)
    acc = PLDAccountant(value_discretization_interval=vdi)
    events = []
    for e in hist:
        g = dp_event.GaussianDpEvent(e.noise_multiplier)
        inner = g if e.sample_rate == 1.0 else dp_event.PoissonSampledDpEvent(e.sample_rate, g)
        events.append(dp_event.SelfComposedDpEvent(inner, e.steps))
    acc.compose(dp_event.ComposedDpEvent(events))
    assert epsilon(HET, 1e-5, "pld") == pytest.approx(acc.get_epsilon(1e-5), abs=1e-9)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_prv_matches_opacus_prv_accountant():
    # only the grid is widened to an FFT-friendly size, so values agree closely
    from opacus.accountants import PRVAccountant

    hist = normalise(HET)
    acc = PRVAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in hist]
    ours = accounting._prv_eps_with_error(hist, 1e-5, 0.01)
    assert ours == pytest.approx(acc.get_epsilon(1e-5, eps_error=0.01), abs=2e-3)


# --------------------------------------------------- analytic Gaussian / zCDP


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018: delta = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s)."""

    def f(eps):
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma) - delta

    return brentq(f, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_pld_matches_analytic_gaussian(sigma):
    delta = 1e-5
    exact = analytic_gaussian_epsilon(sigma, delta)
    pld = epsilon([SG(sigma, 1.0, 1)], delta)
    # pessimistic PLD: an upper bound, within one discretisation interval
    assert exact <= pld <= exact + 0.005
    # Opacus PRV returns estimate + eps_error, with |estimate - exact| <= eps_error
    prv = epsilon([SG(sigma, 1.0, 1)], delta, "prv")
    assert exact <= prv <= exact + 2 * accounting._prv_eps_error(pld)
    assert epsilon([SG(sigma, 1.0, 1)], delta, "rdp") >= exact


def test_gaussian_composition_is_gaussian_with_sigma_over_sqrt_steps():
    exact = analytic_gaussian_epsilon(1.0, 1e-5)  # 4 steps of sigma=2 == one of sigma=1
    assert exact <= epsilon([SG(2.0, 1.0, 4)], 1e-5) <= exact + 0.005


def test_zcdp_rho():
    assert zcdp_rho([SG(1.0, 1.0, 1)]) == pytest.approx(0.5)
    assert zcdp_rho([SG(2.0, 1.0, 3), SG(1.0, 1.0, 2)]) == pytest.approx(3 / 8 + 1.0)
    assert zcdp_rho([]) == 0.0
    assert zcdp_rho([SG(0.0, 1.0, 1)]) == math.inf
    assert zcdp_rho([SG(2.0, 1.0, 3), SG(1.0, 0.5, 0)]) == pytest.approx(3 / 8)  # zero steps: no cost
    with pytest.raises(ValueError, match="subsampled"):
        zcdp_rho([SG(1.0, 1.0, 1), SG(1.0, 0.1, 5)])


# ------------------------------------------------- composition and edge cases


def test_heterogeneous_composition():
    a, b = SG(1.0, 0.01, 200), SG(2.0, 0.05, 100)
    ea, eb, eab, eba = (epsilon(h, 1e-5) for h in ([a], [b], [a, b], [b, a]))
    assert eab > max(ea, eb) + 0.05
    assert eab == pytest.approx(eba, abs=1e-12)
    assert normalise([b, a]) == normalise([a, b]) == (a, b)  # canonical order
    assert epsilon([a, b], 1e-5, "rdp") == pytest.approx(epsilon([b, a], 1e-5, "rdp"), abs=1e-12)


def test_identical_events_merge():
    split = [SG(1.0, 0.02, 100), SG(1.0, 0.02, 150)]
    whole = [SG(1.0, 0.02, 250)]
    assert normalise(split) == tuple(whole)
    assert epsilon(split, 1e-5) == epsilon(whole, 1e-5)
    other = SG(3.0, 0.1, 10)
    # non-consecutive identical events merge too (composition commutes)
    assert epsilon([split[0], other, split[1]], 1e-5) == epsilon([whole[0], other], 1e-5)
    assert epsilon([split[0], other, split[1]], 1e-5) > epsilon(whole, 1e-5)


def test_more_steps_more_epsilon_and_epsilon_after():
    base = [SG(1.0, 0.01, 200)]
    after = epsilon_after(base, SG(1.0, 0.01, 50), 1e-5)
    assert after == epsilon([SG(1.0, 0.01, 250)], 1e-5)
    assert after > epsilon(base, 1e-5)


def test_empty_zero_steps_and_non_private():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([SG(1.0, 0.1, 0)], 1e-5, "prv") == 0.0
    r = epsilon_checked([SG(1.0, 0.1, 0)], 1e-5)
    assert (r.epsilon, r.pld, r.prv, r.rdp) == (0.0, 0.0, 0.0, 0.0)
    for acc in ("pld", "prv", "rdp"):
        assert epsilon([SG(1.0, 0.1, 5), SG(0.0, 0.5, 1)], 1e-5, acc) == math.inf
    assert epsilon([SG(1.0, 0.1, 5), SG(0.0, 0.5, 0)], 1e-5) < math.inf  # zero steps: no release
    assert epsilon_checked([SG(0.0, 1.0, 1)], 1e-5).epsilon == math.inf


def test_huge_epsilon_reported_as_inf():
    # sigma=0.5, no subsampling, 332 steps: epsilon ~ 800, beyond float range of e^eps
    r = epsilon_checked([SG(0.5, 1.0, 332)], 1e-5)
    assert r.epsilon == math.inf
    assert r.rdp > 500


@pytest.mark.parametrize(
    "args",
    [(-1.0, 0.1, 1), (math.nan, 0.1, 1), (math.inf, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, -1), (1.0, 0.1, 1.5), (1.0, 0.1, True)],
)
def test_invalid_events_rejected(args):
    with pytest.raises(AccountingError):
        SG(*args)


def test_invalid_delta_and_accountant():
    for d in (0.0, 1.0, -1e-5):
        with pytest.raises(AccountingError):
            epsilon([SG(1.0, 0.1, 1)], d)
    with pytest.raises(AccountingError, match="unknown accountant"):
        epsilon([SG(1.0, 0.1, 1)], 1e-5, "gdp")


# ------------------------------------------------------------ cross-checking


def test_epsilon_checked_passes_on_heterogeneous_history():
    r = epsilon_checked(HET, 1e-5)
    tol = accounting.agreement_tolerance(r.pld)
    assert abs(r.pld - r.prv) <= tol
    assert r.rdp >= r.pld


def test_epsilon_checked_raises_when_prv_disagrees(monkeypatch):
    hist = [SG(1.0, 0.01, 300)]
    good = epsilon_checked(hist, 1e-5)
    monkeypatch.setattr(accounting, "_prv_eps", lambda h, d: good.pld + 0.1)
    with pytest.raises(AccountingError, match="PLD and PRV disagree"):
        epsilon_checked(hist, 1e-5)
    # a disagreement within the tolerance is accepted
    monkeypatch.setattr(accounting, "_prv_eps", lambda h, d: good.pld + 0.015)
    assert epsilon_checked(hist, 1e-5).epsilon == good.pld


def test_epsilon_checked_raises_when_rdp_below_pld(monkeypatch):
    hist = [SG(1.0, 0.01, 300)]
    pld = epsilon(hist, 1e-5)
    monkeypatch.setattr(accounting, "_rdp_eps", lambda h, d: pld - 0.2)
    with pytest.raises(AccountingError, match="RDP upper bound below PLD"):
        epsilon_checked(hist, 1e-5)


def test_fast_rdp_is_a_looser_upper_bound():
    from shared.privacy.accounting import SampledGaussian, epsilon

    events = [SampledGaussian(4.0, 1.0, 1), SampledGaussian(1.0, 1 / 7, 140)]
    pld, rdp, fast = (epsilon(events, 1e-5, a) for a in ("pld", "rdp", "rdp-fast"))
    assert pld <= rdp <= fast <= rdp * 1.05
