"""Privacy accounting for avrec: every epsilon we print comes from here.

The only mechanism avrec uses is the (Poisson-)subsampled Gaussian mechanism,
recorded as :class:`SampledGaussian` events.  Epsilon is computed by three
independent accountants:

* ``"pld"``  -- Google ``dp_accounting`` privacy loss distributions
  (add/remove-one neighbouring, pessimistic "connect the dots" discretisation).
  This is the tight value avrec reports.
* ``"prv"``  -- Opacus ``PRVAccountant`` (Gopi et al. 2021), an independent
  numerical implementation used as a cross-check.
* ``"rdp"``  -- Opacus ``RDPAccountant``, a looser upper bound.

Numerical choices (measured on this machine with dp-accounting 0.6.0 and
opacus 1.6.0; see ``tests/test_accounting.py``):

* History normalisation: events are validated, events with ``steps == 0`` are
  dropped and *all* events with identical ``(noise_multiplier, sample_rate)``
  are merged by summing steps (composition is commutative, so this is exact and
  a superset of merging consecutive ones).  Events are then sorted, so the
  result does not depend on the order of the history.
* PLD ``value_discretization_interval`` (vdi).  The pessimistic PLD is always
  an upper bound; its excess over the exact epsilon grew like ``T * vdi**2``
  in our measurements (T = number of discretised compositions), and was worst
  when one step's privacy loss is tiny compared with vdi (sigma=3, q=1e-3,
  T=300: excess 0.020 on an epsilon of 0.016 at vdi=2e-3).  So vdi is the
  largest ``1e-3 * 2**(k/2)`` (k integer; a coarse grid of values lets cached
  per-mechanism PLDs be reused) not above
  ``min(2e-3, 0.035 / sqrt(T), 0.25 * s) * max(1, eps_rdp / 10)``, where
  ``s = sqrt(sum_i T_i q_i^2 (exp(1/sigma_i^2) - 1) / sum_i T_i)`` is the
  step-weighted RMS spread of one step's privacy loss, and the last factor
  keeps huge (non-amplified) epsilons affordable.  Measured excess against
  vdi=5e-5 on 14 regimes (T up to 10000, eps 0.004-30): <= 0.0012.
  (NOTES 3's "PLD ~0.26" was taken at vdi=1e-3 and is 0.0095 too high.)
* PRV ``eps_error = max(0.01, 0.005 * eps_pld)`` (Opacus's default 0.01 for
  epsilon <= 2; relative above, since a fixed 0.01 makes the grid grow with
  epsilon), ``delta_error = delta / 1000`` (Opacus default).  Opacus reports
  the upper bound ``eps_estimate + eps_error`` with
  ``|eps_estimate - eps_true| <= eps_error`` (Gopi et al. 2021); that upper
  bound is ``EpsilonReport.prv`` (equal to ``PRVAccountant.get_epsilon``; our
  grid is only widened to an FFT-friendly size).
* Agreement tolerance ``tol = max(0.02, 0.02 * eps_pld)``.  In exact
  arithmetic ``pld - prv`` lies in ``[-2 * eps_error, pld_excess]``, and
  ``2 * eps_error <= tol`` while ``pld_excess <~ 0.002``; so correct
  accountants fed the same history satisfy ``|pld - prv| <= tol`` (a random
  sweep of 150 histories reached at most 0.52 tol).  RDP is an upper bound, so
  ``rdp >= pld - tol`` must hold too.  Anything else raises AccountingError.
* Above ``EPS_CHECK_MAX = 500`` (exp(eps) overflows float64 near 709 inside
  both libraries; no meaningful guarantee is left) ``epsilon_checked``
  reports ``math.inf`` once PLD and PRV both put epsilon that high.

Speed: RDP curves per (sigma, q), PLDs per (sigma, q, steps, vdi) and whole
results per (history, delta) are memoised (LRU), so identical histories cost
~0.1 ms.  Cold ``epsilon_checked`` for a 300-step history took 0.05-0.1 s
with one distinct event, ~0.2-0.3 s with 5 and ~0.6-1.0 s with 20 (2 shared,
loaded CPUs); Opacus's PRV (per-event numerical mean and convolutions) and
RDP (pure-Python series) dominate.  Histories are independent, so callers can
spread many clients over processes.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "SampledGaussian",
    "AccountingError",
    "EpsilonReport",
    "ACCOUNTANTS",
    "epsilon",
    "epsilon_checked",
    "epsilon_after",
    "zcdp_rho",
    "normalise",
    "agreement_tolerance",
]

ACCOUNTANTS = ("pld", "prv", "rdp", "rdp-fast")

# Opacus's RDP orders (RDPAccountant.DEFAULT_ALPHAS), copied so that the RDP
# numbers equal RDPAccountant's; test_accounting checks they are identical.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)

PLD_VDI_BASE = 1e-3  # vdi is PLD_VDI_BASE * 2**(k/2) for an integer k
PLD_VDI_MAX = 2e-3  # coarsest PLD value_discretization_interval for eps <= 10
PLD_VDI_SCALE = 0.035  # vdi <= PLD_VDI_SCALE / sqrt(T)
PLD_VDI_SPREAD = 0.25  # vdi <= PLD_VDI_SPREAD * spread of one step's privacy loss
PRV_EPS_ERROR_MIN = 0.01  # Opacus default
PRV_EPS_ERROR_REL = 0.005
TOL_ABS = 0.02
TOL_REL = 0.02
EPS_CHECK_MAX = 500.0  # above this epsilon_checked reports math.inf (see there)


class AccountingError(RuntimeError):
    """Accountants disagree beyond their stated error, or events are invalid."""


@dataclass(frozen=True)
class SampledGaussian:
    """`steps` compositions of a Gaussian mechanism with noise multiplier sigma
    (std = sigma * sensitivity), each applied to a Poisson subsample with rate
    `sample_rate` (1.0 = no subsampling)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        s, q, t = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s < 0:
            raise AccountingError(f"noise_multiplier must be a finite number >= 0, got {s!r}")
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not (0.0 < q <= 1.0):
            raise AccountingError(f"sample_rate must be in (0, 1], got {q!r}")
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise AccountingError(f"steps must be an integer >= 0, got {t!r}")
        # store plain Python numbers (hashable, JSON-friendly, cache keys)
        object.__setattr__(self, "noise_multiplier", float(s))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(t))


@dataclass(frozen=True)
class EpsilonReport:
    epsilon: float  # the tight value reported (PLD)
    delta: float
    pld: float
    prv: float
    rdp: float  # upper bound, looser
    accountant: str  # which libraries produced and checked the value


# --------------------------------------------------------------------------
# history normalisation


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not (0.0 < delta < 1.0):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def normalise(events: Iterable[SampledGaussian]) -> tuple[SampledGaussian, ...]:
    """Drop zero-step events, merge identical (sigma, q) by summing steps, sort."""
    merged: dict[tuple[float, float], int] = {}
    for ev in events:
        if not isinstance(ev, SampledGaussian):
            raise AccountingError(f"expected SampledGaussian events, got {type(ev).__name__}")
        if ev.steps == 0:
            continue
        key = (ev.noise_multiplier, ev.sample_rate)
        merged[key] = merged.get(key, 0) + ev.steps
    return tuple(SampledGaussian(s, q, n) for (s, q), n in sorted(merged.items()))


def _is_non_private(hist: Sequence[SampledGaussian]) -> bool:
    return any(ev.noise_multiplier == 0.0 for ev in hist)


# --------------------------------------------------------------------------
# RDP (Opacus)


# A coarse grid for pre-round budget checks: Opacus evaluates fractional orders by a slow series (about
# 25 ms per order and (sigma, q) here), so its default grid costs seconds per new sampling rate. Fewer
# orders give a slightly larger epsilon: still an upper bound, so a check with it is conservative.
RDP_ORDERS_FAST: tuple[float, ...] = (1.25, 1.5, 1.75, 2.5, 3.5) + tuple(float(a) for a in range(2, 129))


@functools.lru_cache(maxsize=4096)
def _rdp_curve(sigma: float, q: float, orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    curve = np.asarray(curve, dtype=float)
    curve.setflags(write=False)
    return curve


def _rdp_total(hist: Sequence[SampledGaussian], orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    return sum(
        (_rdp_curve(e.noise_multiplier, e.sample_rate, orders) * e.steps for e in hist), np.zeros(len(orders))
    )


def _rdp_eps_from_curve(curve: np.ndarray, delta: float, orders: tuple[float, ...] = RDP_ORDERS) -> float:
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        # "optimal order is the largest/smallest alpha": informative only
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=8192)
def _rdp_eps(hist: tuple[SampledGaussian, ...], delta: float, orders: tuple[float, ...] = RDP_ORDERS) -> float:
    if not hist:
        return 0.0
    if _is_non_private(hist):
        return math.inf
    return _rdp_eps_from_curve(_rdp_total(hist, orders), delta, orders)


# --------------------------------------------------------------------------
# PLD (dp_accounting)


def _pld_vdi(hist: Sequence[SampledGaussian], delta: float) -> float:
    """Discretisation interval for the PLD accountant (see module docstring)."""
    # number of discretised compositions: a non-subsampled Gaussian event is
    # composed exactly (one Gaussian with sigma / sqrt(steps)), like PLDAccountant
    t = sum(1 if e.sample_rate == 1.0 else e.steps for e in hist)
    target = min(PLD_VDI_MAX, PLD_VDI_SCALE / math.sqrt(max(t, 1)))
    # resolve the per-step privacy loss: for a subsampled Gaussian its spread
    # is about q * sqrt(exp(1/sigma^2) - 1); use the step-weighted RMS spread
    sub = [e for e in hist if e.sample_rate < 1.0]
    if sub:
        sq = 0.0
        for e in sub:
            try:
                sq += e.steps * e.sample_rate**2 * math.expm1(1.0 / e.noise_multiplier**2)
            except OverflowError:
                sq = math.inf
        spread = math.sqrt(sq / sum(e.steps for e in sub))
        target = min(target, PLD_VDI_SPREAD * spread)
    eps_rdp = _rdp_eps(tuple(hist), delta)
    if math.isfinite(eps_rdp):
        target *= max(1.0, eps_rdp / 10.0)
    k = math.floor(2.0 * math.log2(target / PLD_VDI_BASE) + 1e-9)
    return PLD_VDI_BASE * 2.0 ** (k / 2.0)


@functools.lru_cache(maxsize=256)  # PLD objects hold arrays of ~1e4-1e5 floats
def _pld_single(sigma: float, q: float, vdi: float):
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    # same call as dp_accounting's PLDAccountant for PoissonSampled(Gaussian)
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=vdi,
        sampling_prob=q,
        neighboring_relation=pld_lib.NeighborRel.ADD_OR_REMOVE_ONE,
    )


@functools.lru_cache(maxsize=256)
def _pld_component(sigma: float, q: float, steps: int, vdi: float):
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if q == 1.0:
        # PLDAccountant's GaussianDpEvent path: `steps` Gaussians of std sigma
        # compose exactly to one Gaussian of std sigma / sqrt(steps)
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=sigma / math.sqrt(steps),
            value_discretization_interval=vdi,
            neighboring_relation=pld_lib.NeighborRel.ADD_OR_REMOVE_ONE,
        )
    single = _pld_single(sigma, q, vdi)
    return single if steps == 1 else single.self_compose(steps)


def _pld_eps_vdi(hist: tuple[SampledGaussian, ...], delta: float, vdi: float) -> float:
    if not hist:
        return 0.0
    if _is_non_private(hist):
        return math.inf
    with warnings.catch_warnings(), np.errstate(over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow -> inf for eps >~ 700
        total = None
        for e in hist:
            comp = _pld_component(e.noise_multiplier, e.sample_rate, e.steps, vdi)
            total = comp if total is None else total.compose(comp)
        return float(total.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=8192)
def _pld_eps(hist: tuple[SampledGaussian, ...], delta: float) -> float:
    if not hist:
        return 0.0
    if _is_non_private(hist):
        return math.inf
    return _pld_eps_vdi(hist, delta, _pld_vdi(hist, delta))


# --------------------------------------------------------------------------
# PRV (Opacus)


def _prv_eps_error(eps_pld: float) -> float:
    return max(PRV_EPS_ERROR_MIN, PRV_EPS_ERROR_REL * eps_pld) if math.isfinite(eps_pld) else PRV_EPS_ERROR_MIN


def _prv_bounds(hist: tuple[SampledGaussian, ...], delta: float, eps_error: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) from Opacus's PRV machinery.

    Identical to ``PRVAccountant._get_dprv`` + ``DiscretePRV.compute_epsilon``
    (``PRVAccountant.get_epsilon`` returns ``upper``), except that the safe
    domain size (Gopi et al., remark 5.6, as in Opacus's
    ``compute_safe_domain_size``) uses the cached per-mechanism RDP curves
    instead of recomputing them.
    """
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )
    from scipy.fft import next_fast_len

    delta_error = delta / 1000  # Opacus default
    counts = [e.steps for e in hist]
    total = sum(counts)
    # compute_safe_domain_size
    l_max = _rdp_eps_from_curve(_rdp_total(hist), delta_error / 4)
    for e in hist:
        l_max = max(
            l_max,
            _rdp_eps_from_curve(_rdp_curve(e.noise_multiplier, e.sample_rate), delta_error / (8 * total)),
        )
    domain_l = max(l_max, eps_error) + 3
    # PRVAccountant._get_domain
    mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-domain_l, domain_l, mesh_size)
    # Widen the grid symmetrically to an FFT-friendly (5-smooth, even) size: a
    # larger domain is still safe, and pocketfft is ~10x slower on sizes with a
    # large prime factor (Opacus's arbitrary sizes often have one).  The grid
    # keeps create_aligned's layout [-k dt, (k+1) dt], size 2k+2, which
    # Opacus's Fourier self-composition relies on (zero at the centre).
    size = domain.size
    fast = next_fast_len(size, real=True)
    while fast % 2:
        fast = next_fast_len(fast + 1, real=True)
    if fast != size:
        dt = domain.dt
        k = (fast - 2) // 2
        domain = Domain(t_min=-k * dt, t_max=(k + 1) * dt, size=fast)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        warnings.simplefilter("ignore")  # q == 1 makes log(1 - q) = -inf, harmless
        prvs = [PoissonSubsampledGaussianPRV(e.sample_rate, e.noise_multiplier) for e in hist]
        tprvs = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]
        dprvs = [discretize(t, domain) for t in tprvs]
        dprv = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
        lower, est, upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(lower), float(est), float(upper)


@functools.lru_cache(maxsize=8192)
def _prv_eps_with_error(hist: tuple[SampledGaussian, ...], delta: float, eps_error: float) -> float:
    if not hist:
        return 0.0
    if _is_non_private(hist):
        return math.inf
    try:
        return _prv_bounds(hist, delta, eps_error)[2]
    except (ValueError, RuntimeError) as exc:  # Opacus numerical guards
        raise AccountingError(
            f"Opacus PRV accountant failed for history {list(hist)} at delta={delta}: {exc}"
        ) from exc


def _prv_eps(hist: tuple[SampledGaussian, ...], delta: float) -> float:
    scale = _pld_eps(hist, delta)
    if not math.isfinite(scale):  # PLD overflowed (eps >~ 700): size the grid by RDP
        scale = _rdp_eps(hist, delta)
    return _prv_eps_with_error(hist, delta, _prv_eps_error(scale))


# --------------------------------------------------------------------------
# public API


def epsilon(events: Sequence[SampledGaussian], delta: float, accountant: str = "pld") -> float:
    """Epsilon at `delta` of the composition of `events` (add/remove neighbouring).

    accountant: "pld" (dp_accounting PLD, tight), "prv" (Opacus PRV upper bound),
    "rdp" (Opacus RDP, loose upper bound), "rdp-fast" (RDP on a coarse order grid: a looser upper bound
    for quick budget checks).  No events / all zero steps -> 0.0;
    any noise_multiplier == 0 with steps > 0 -> math.inf.
    """
    delta = _check_delta(delta)
    hist = normalise(events)
    if accountant == "pld":
        return _pld_eps(hist, delta)
    if accountant == "prv":
        return _prv_eps(hist, delta)
    if accountant == "rdp":
        return _rdp_eps(hist, delta)
    if accountant == "rdp-fast":
        return _rdp_eps(hist, delta, RDP_ORDERS_FAST)
    raise AccountingError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")


def agreement_tolerance(eps_pld: float) -> float:
    """Largest |PLD - PRV| accepted by :func:`epsilon_checked`."""
    return max(TOL_ABS, TOL_REL * eps_pld)


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    return (
        f"dp-accounting {importlib.metadata.version('dp-accounting')} PLD, cross-checked with "
        f"opacus {importlib.metadata.version('opacus')} PRV and RDP"
    )


def epsilon_checked(events: Sequence[SampledGaussian], delta: float) -> EpsilonReport:
    """PLD epsilon, cross-checked against Opacus PRV and RDP.

    Raises AccountingError if |PLD - PRV| > max(0.02, 2% of PLD) or if RDP (an
    upper bound) is below PLD minus that tolerance.
    """
    delta = _check_delta(delta)
    hist = normalise(events)
    pld = _pld_eps(hist, delta)
    prv = _prv_eps(hist, delta)
    rdp = _rdp_eps(hist, delta)
    label = _versions()
    if not hist:
        return EpsilonReport(0.0, delta, 0.0, 0.0, 0.0, label)
    if _is_non_private(hist):
        if not (math.isinf(pld) and math.isinf(prv) and math.isinf(rdp)):
            raise AccountingError(
                f"non-private event in history but accountants gave pld={pld}, prv={prv}, rdp={rdp}"
            )
        return EpsilonReport(math.inf, delta, math.inf, math.inf, math.inf, label)
    if max(pld, prv) > EPS_CHECK_MAX:
        # exp(eps) overflows float64 near 709 inside both libraries, and no
        # meaningful guarantee exists this far out: report inf (always a valid
        # bound) once both agree that epsilon is that large.
        floor = EPS_CHECK_MAX - agreement_tolerance(EPS_CHECK_MAX)
        if min(pld, prv) < floor:
            raise AccountingError(
                f"PLD and PRV disagree at delta={delta}: pld={pld}, prv={prv} "
                f"(one above {EPS_CHECK_MAX}, the other below {floor}); history={list(hist)}"
            )
        return EpsilonReport(math.inf, delta, pld, prv, rdp, label)
    if not all(math.isfinite(v) and v >= 0 for v in (pld, prv, rdp)):
        raise AccountingError(f"invalid epsilon for a private history: pld={pld}, prv={prv}, rdp={rdp}")
    tol = agreement_tolerance(pld)
    if abs(pld - prv) > tol:
        raise AccountingError(
            f"PLD and PRV disagree at delta={delta}: pld={pld:.6f}, prv={prv:.6f}, "
            f"|diff|={abs(pld - prv):.6f} > tolerance {tol:.6f}; history={list(hist)}"
        )
    if rdp < pld - tol:
        raise AccountingError(
            f"RDP upper bound below PLD at delta={delta}: rdp={rdp:.6f} < pld={pld:.6f} - "
            f"tolerance {tol:.6f}; history={list(hist)}"
        )
    return EpsilonReport(pld, delta, pld, prv, rdp, label)


def epsilon_after(
    events: Sequence[SampledGaussian], new_event: SampledGaussian, delta: float, accountant: str = "pld"
) -> float:
    """Epsilon if `new_event` were added to `events` (for budget checks before training)."""
    return epsilon([*events, new_event], delta, accountant)


def zcdp_rho(events: Sequence[SampledGaussian]) -> float:
    """zCDP rho of a composition of non-subsampled Gaussians: sum(steps / (2 sigma^2))."""
    hist = normalise(events)
    sub = [e for e in hist if e.sample_rate != 1.0]
    if sub:
        raise ValueError(
            "zcdp_rho: subsampled Gaussian events (sample_rate < 1) have no closed-form zCDP rho; "
            f"use epsilon() instead. Offending events: {sub}"
        )
    rho = 0.0
    for e in hist:
        if e.noise_multiplier == 0.0:
            return math.inf
        rho += e.steps / (2.0 * e.noise_multiplier**2)
    return rho


def clear_caches() -> None:
    """Drop all memoised accountant results (mainly for tests and benchmarks)."""
    for f in (_rdp_curve, _rdp_eps, _pld_single, _pld_component, _pld_eps, _prv_eps_with_error):
        f.cache_clear()
