"""The distributed discrete Gaussian (DDG) mechanism and its RDP accountant.

Why: with secure aggregation the server sees only the sum of the devices' vectors modulo 2**bits, so
the DP noise has to be added on the devices, in integers. Each device clips, scales, rotates and
rounds its update to an integer vector and adds a discrete Gaussian share; the modular sum then
holds the signal plus the sum of the surviving shares. The accountant bounds the privacy of that sum.

Sources (theorem numbers of arXiv 2102.06387 as also cited by the reference code):

* Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
  Secure Aggregation", ICML 2021 (arXiv 2102.06387): the norm bound of conditionally randomised
  rounding (Theorem 1, Eq. 2; Proposition 22), the RDP of a sum of n discrete Gaussians with its tau
  term (Theorem 1; Proposition 14, Eq. 17), the choice of granularity so that k standard deviations of
  the aggregate fit the modulus (Sections 4.2 and 4.4, Eq. 61).
* Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020 (arXiv
  2004.00010): the sampler (discrete Laplace proposal + Bernoulli rejection, Algorithm 3 there) and
  the RDP -> (eps, delta) conversion (Proposition 12), used through dp_accounting.
* Zhu, Wang, "Poisson Subsampled Renyi Differential Privacy", ICML 2019: Theorem 5 (general upper
  bound for integer orders) for Poisson subsampling.

Checked against google-research/federated ``distributed_dp/`` (accounting_utils.py,
compression_utils.py) and TensorFlow Federated's ``DistributedDpSumFactory``; see
tests/test_distributed_dp.py for the known-answer values. Deliberate differences from the reference:
the local standard deviation may be any real (the TF sampler truncates it to an integer); no cap on
the scale factor (TFF caps 1/gamma at 1e6 for int32 arithmetic; here integers are int64 and bits <= 48);
the rounding check compares against exactly the bound the accountant uses (no 1e-5 leeway needed).

Neighbouring relation (as in the paper and the reference): the two inputs differ in one device's update,
present in one and zero in the other, with the same ``survivors`` noise shares in the sum either way;
with sample_rate < 1 this is fed to Zhu-Wang's add/remove subsampling bound, as the reference does.
A strict add/remove in which the removed device also takes its noise share away changes the noise
variance by a factor (m-1)/m as well; neither this analysis nor the reference covers that case.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

__all__ = [
    "MECHANISM",
    "NEIGHBOURING",
    "DDGPlan",
    "RDP_ORDERS",
    "plan_ddg",
    "encode",
    "modular_sum",
    "decode",
    "sample_discrete_gaussian",
    "rounded_l2_norm_bound",
    "ddg_rdp",
    "ddg_epsilon",
]

MECHANISM = "ddg-secure-sum"  # the ledger's name for one round of this mechanism (trust model `secure`)
# What the analysis covers, at user level: the participant set is public and a user's data is zeroed out.
NEIGHBOURING = ("zero out one user's data: its device still takes part and adds its noise share (the "
                "participant set is public)")

# Integer orders (Zhu-Wang's bound needs integers), the reference's grid.
RDP_ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (256,)
MAX_BITS = 48  # sums stay far below 2**53, so float64 rotation and decoding keep every integer
MAX_ROUNDING_TRIES = 1000


# --------------------------------------------------------------------------------------------------
# validation helpers


def _real(name: str, value: object, *, low: float, low_ok: bool, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if v < low or (v == low and not low_ok) or v >= high:
        lo = "[" if low_ok else "("
        raise ValueError(f"{name} must be in {lo}{low}, {high}), got {value!r}")
    return v


def _integer(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------------
# the plan


def rounded_l2_norm_bound(scaled_norm: float, beta: float, dim: int) -> float:
    """L2 norm bound after (conditionally) randomised rounding to the integer grid.

    Kairouz et al. Theorem 1 (Eq. 2) / Proposition 22: with x in R^d, ||x|| <= c, unconditional
    randomised rounding gives ||round(x)|| <= c + sqrt(d) surely, and with probability >= 1 - beta
    ||round(x)||^2 <= c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2). Conditional rounding retries
    until the rounded norm is within the smaller of the two, which makes the bound hold surely.
    """
    c = _real("scaled_norm", scaled_norm, low=0.0, low_ok=False)
    b = _real("beta", beta, low=0.0, low_ok=True, high=1.0)
    d = _integer("dim", dim, low=1)
    bound_1 = c + math.sqrt(d)
    if b == 0.0:
        return bound_1
    bound_2 = math.sqrt(c * c + 0.25 * d + math.sqrt(2.0 * math.log(1.0 / b)) * (c + 0.5 * math.sqrt(d)))
    return min(bound_1, bound_2)


@dataclass(frozen=True)
class DDGPlan:
    """All parameters of one round of the distributed discrete Gaussian (see plan_ddg)."""

    clip: float  # L2 clip norm C of each device's update (float units)
    noise_multiplier: float  # central noise std / C (what a trusted server would add), before splitting
    expected_clients: int  # n: devices expected to contribute; each adds variance 1/n of the total
    dimension: int  # d: length of the flat update
    bits: int  # modulus 2**bits for the modular sum
    beta: float  # conditional randomised rounding parameter (paper: beta = exp(-0.5))
    gamma: float  # granularity: float units per integer step
    padded_dimension: int  # d rounded up to a power of 2 for the Hadamard rotation
    local_stddev: float  # each device's discrete Gaussian std, in integer units
    k_stddevs: float  # standard deviations of the aggregate that fit in the modulus
    rounded_l2_bound: float  # integer units: every encoded signal's L2 norm is <= this (the sensitivity)
    rounded_l1_bound: float  # integer units: L1 bound implied by it (integers: L1 <= min(sqrt(D), L2) L2)

    def __post_init__(self) -> None:
        D = self.padded_dimension
        if D < self.dimension or D & (D - 1):
            raise ValueError(
                f"padded_dimension must be a power of 2 >= dimension={self.dimension}, got {D!r}"
            )

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    def details(self) -> dict:
        """Everything the ledger must record about the mechanism (JSON-serialisable)."""
        out: dict = {
            "mechanism": "distributed_discrete_gaussian",
            "reference": "Kairouz, Liu, Steinke, ICML 2021 (arXiv 2102.06387)",
        }
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = int(v) if isinstance(v, (int, np.integer)) else float(v)
        out.update(
            modulus=self.modulus,
            central_stddev=self.noise_multiplier * self.clip,
            sensitivity_inflation=self.rounded_l2_bound * self.gamma / self.clip,
            rotation="randomized Walsh-Hadamard; signs = bits of PCG64(rotation_seed).random_raw",
            rounding="conditional randomised rounding (retry until L2 <= rounded_l2_bound)",
            neighbouring="one device's update present or zeroed; its noise share stays in the sum",
            rdp_orders="2..128 and 256 (integers)",
            subsampling="Poisson; Zhu-Wang 2019 Theorem 5, min with the unsampled bound",
        )
        return out


def plan_ddg(
    clip: float,
    noise_multiplier: float,
    expected_clients: int,
    dimension: int,
    bits: int,
    beta: float = math.exp(-0.5),
    k_stddevs: float = 4.0,
) -> DDGPlan:
    """Choose gamma as the reference does (the modular range must hold the sum of n rounded, rotated,
    noised updates with k_stddevs of headroom) and the local std = noise_multiplier*C / (gamma*sqrt(n)).

    Granularity (Kairouz et al. Sections 4.2/4.4, Eq. 61; TFF ``_heuristic_scale_factor`` with rho = 1):
    treating each coordinate of the aggregate as subgaussian with variance
    (C^2 n^2 / D + n (gamma^2/4 + sigma^2)) / gamma^2 (sigma = local std in float units; n^2 covers n
    aligned updates), solve 2**bits = 2 k sqrt(that variance) for gamma.
    """
    c = _real("clip", clip, low=0.0, low_ok=False)
    z = _real("noise_multiplier", noise_multiplier, low=0.0, low_ok=True)
    n = _integer("expected_clients", expected_clients, low=1)
    d = _integer("dimension", dimension, low=1)
    b = _integer("bits", bits, low=1, high=MAX_BITS)
    be = _real("beta", beta, low=0.0, low_ok=True, high=1.0)
    k = _real("k_stddevs", k_stddevs, low=0.0, low_ok=False)
    if 2**b < n:
        raise ValueError(f"bits must be >= log2(expected_clients)={math.log2(n):.2f}, got bits={b}")
    headroom = 4.0**b - n * k * k
    if headroom <= 0:
        raise ValueError(
            f"bits={b} is too few: 2**(2*bits) must exceed expected_clients * k_stddevs**2 = {n * k * k:g}"
        )
    D = 1 << (d - 1).bit_length()
    sigma_float = z * c / math.sqrt(n)
    gamma = 2.0 * k * math.sqrt(c * c * n * n / D + n * sigma_float**2) / math.sqrt(headroom)
    l2 = rounded_l2_norm_bound(c / gamma, be, D)
    if l2 >= 2.0**52:
        raise ValueError(f"bits={b} gives a rounded norm bound {l2:.3g} beyond exact float64 integers (2**52)")
    return DDGPlan(
        clip=c,
        noise_multiplier=z,
        expected_clients=n,
        dimension=d,
        bits=b,
        beta=be,
        gamma=gamma,
        padded_dimension=D,
        local_stddev=sigma_float / gamma,
        k_stddevs=k,
        rounded_l2_bound=l2,
        rounded_l1_bound=l2 * min(math.sqrt(D), l2),
    )


# --------------------------------------------------------------------------------------------------
# rotation


def _fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform H_D x / sqrt(D) of a length-D vector, D a power of 2
    (H_D / sqrt(D) is symmetric and orthogonal, so this is its own inverse).

    In-order (Sylvester) fast transform, two butterfly stages at a time (radix 4), written alternately
    into two buffers; pure numpy, so no BLAS threads compete with other devices' encoders.
    """
    D = x.shape[0]
    y = np.array(x, dtype=np.float64)
    z = np.empty_like(y)
    h = 1
    while h < D:
        if 4 * h <= D:
            v, w = y.reshape(-1, 4, h), z.reshape(-1, 4, h)
            p, q = v[:, 0] + v[:, 1], v[:, 0] - v[:, 1]
            r, t = v[:, 2] + v[:, 3], v[:, 2] - v[:, 3]
            np.add(p, r, out=w[:, 0])
            np.add(q, t, out=w[:, 1])
            np.subtract(p, r, out=w[:, 2])
            np.subtract(q, t, out=w[:, 3])
            h *= 4
        else:
            v, w = y.reshape(-1, 2, h), z.reshape(-1, 2, h)
            np.add(v[:, 0], v[:, 1], out=w[:, 0])
            np.subtract(v[:, 0], v[:, 1], out=w[:, 1])
            h *= 2
        y, z = z, y
    y *= 1.0 / math.sqrt(D)
    return y


@functools.lru_cache(maxsize=8)
def _signs(rotation_seed: int, D: int) -> np.ndarray:
    # Bit generators' raw streams are stable across numpy versions (Generator methods need not be),
    # so devices and server agree whatever numpy they run.
    raw = np.random.PCG64(rotation_seed).random_raw((D + 63) // 64).astype("<u8")
    bits = np.unpackbits(raw.view(np.uint8), bitorder="little")[:D]
    s = 1.0 - 2.0 * bits.astype(np.float64)
    s.setflags(write=False)
    return s


def _rotate(x: np.ndarray, rotation_seed: int) -> np.ndarray:
    return _fwht(x * _signs(rotation_seed, x.shape[0]))


def _unrotate(y: np.ndarray, rotation_seed: int) -> np.ndarray:
    return _fwht(y) * _signs(rotation_seed, y.shape[0])


def _check_seed(rotation_seed: object) -> int:
    return _integer("rotation_seed", rotation_seed, low=0)


# --------------------------------------------------------------------------------------------------
# sampler


def sample_discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Canonne-Kamath-Steinke exact sampler (via discrete Laplace + Bernoulli rejection), vectorised in numpy.

    CKS20 Algorithm 3: with t = floor(sigma) + 1, draw Y from the discrete Laplace P(y) ~ exp(-|y|/t)
    and accept it with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)); accepted values follow
    P(y) ~ exp(-y^2 / (2 sigma^2)) exactly. The discrete Laplace is drawn as in CKS20 Algorithm 2:
    a magnitude G with P(G = g) ~ exp(-g/t) (here floor(t E), E ~ Exp(1)) and a fair sign, rejecting
    (negative, 0). The Bernoulli(exp(-v)) test is "E' >= v" for E' ~ Exp(1). Draws use float64
    (like the TF reference) rather than the paper's exact rational arithmetic.
    Returns int64 of length `size` (zeros when sigma == 0).
    """
    s = _real("sigma", sigma, low=0.0, low_ok=True)
    n = _integer("size", size, low=0)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    out = np.zeros(n, dtype=np.int64)
    if s == 0.0 or n == 0:
        return out
    t = math.floor(s) + 1.0
    centre, two_var = s * s / t, 2.0 * s * s
    filled, rate = 0, 0.7  # rate: running estimate of the acceptance probability (about 0.6-0.8)
    while filled < n:
        need = n - filled
        m = int(1.05 * need / rate) + 64
        g = rng.standard_exponential(m)
        g *= t
        np.floor(g, out=g)  # magnitude: P(G = g) ~ exp(-g/t)
        negative = np.unpackbits(rng.bit_generator.random_raw((m + 63) // 64).view(np.uint8))[:m].view(bool)
        v = g - centre
        np.square(v, out=v)
        v /= two_var
        ok = rng.standard_exponential(m) >= v  # Bernoulli(exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)))
        ok &= ~(negative & (g == 0.0))  # discrete Laplace: a "negative zero" is drawn again
        keep = g[ok]
        rate = max(keep.size / m, 0.05)
        keep = keep[:need]
        np.negative(keep, out=keep, where=negative[ok][: keep.size])
        out[filled : filled + keep.size] = keep
        filled += keep.size
    return out


# --------------------------------------------------------------------------------------------------
# device and server


def encode(update: np.ndarray, plan: DDGPlan, rotation_seed: int, rng: np.random.Generator) -> np.ndarray:
    """Device side: flat float update -> clip to C (L2) -> scale 1/gamma -> randomised Hadamard rotation
    (random signs from the PUBLIC rotation_seed, so the server can invert) -> conditional randomised
    rounding (retry until the rounded norm is within the bound the accountant uses) -> + discrete
    Gaussian share (local_stddev, drawn from rng) -> mod 2**bits.
    Returns int64 in [0, 2**bits), length padded_dimension.

    Raises ValueError if this device's own integer vector already leaves [-2**(bits-1), 2**(bits-1))
    (the plan's bits are too few for it; the sum would wrap).
    """
    seed = _check_seed(rotation_seed)
    if not isinstance(plan, DDGPlan):
        raise ValueError(f"plan must be a DDGPlan, got {type(plan).__name__}")
    x = np.asarray(update)
    if x.ndim != 1 or x.shape[0] != plan.dimension:
        raise ValueError(f"update must be a flat vector of length {plan.dimension}, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"update must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("update must be finite, got NaN or inf entries")
    norm = math.sqrt(float(np.einsum("i,i->", x, x)))
    D = plan.padded_dimension
    v = np.zeros(D)
    v[: plan.dimension] = x * (min(1.0, plan.clip / norm) if norm > 0 else 1.0) / plan.gamma
    v = _rotate(v, seed)

    # Conditional randomised rounding (Kairouz et al. Section 4.1 / Proposition 22). The check is on
    # the integer vector itself, so the accountant's bound holds exactly; the 1e-12 margin absorbs
    # float error in the sum of squares of large integers. (einsum, not the BLAS dot: the dot's idle
    # threads spin on the second core after each call.)
    floor = np.floor(v)
    frac = v - floor
    limit = (plan.rounded_l2_bound * (1.0 - 1e-12)) ** 2
    for _ in range(MAX_ROUNDING_TRIES):
        r = floor + (rng.random(D) < frac)
        if float(np.einsum("i,i->", r, r)) <= limit:
            break
    else:
        raise RuntimeError(
            f"conditional rounding failed {MAX_ROUNDING_TRIES} times against bound {plan.rounded_l2_bound}"
        )
    y = r.astype(np.int64)
    y += sample_discrete_gaussian(plan.local_stddev, D, rng)
    half = 1 << (plan.bits - 1)
    lo, hi = int(y.min()), int(y.max())
    if lo < -half or hi >= half:
        raise ValueError(
            f"encoded coordinates span [{lo}, {hi}], outside the modular range [-2**{plan.bits - 1}, "
            f"2**{plan.bits - 1}) of bits={plan.bits}: bits too few for this plan"
        )
    return np.bitwise_and(y, plan.modulus - 1)


def _check_residues(name: str, v: object, bits: int, length: int | None) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1 or (length is not None and a.shape[0] != length):
        want = "a flat vector" if length is None else f"a flat vector of length {length}"
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= 1 << bits):
        raise ValueError(f"{name} entries must be in [0, 2**{bits}), got [{int(a.min())}, {int(a.max())}]")
    return a.astype(np.int64)


def modular_sum(vectors: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """What secure aggregation reveals: the sum mod 2**bits."""
    b = _integer("bits", bits, low=1, high=62)
    mask = (1 << b) - 1
    total: np.ndarray | None = None
    for i, v in enumerate(vectors):
        a = _check_residues(f"vectors[{i}]", v, b, None if total is None else total.shape[0])
        total = a.copy() if total is None else np.bitwise_and(total + a, mask)
    if total is None:
        raise ValueError("vectors must hold at least one vector, got none")
    return total


def decode(total: np.ndarray, plan: DDGPlan, rotation_seed: int) -> np.ndarray:
    """Server side: mod sum -> centred in [-2**(bits-1), 2**(bits-1)) -> inverse rotation -> * gamma ->
    crop to dimension. Returns the float SUM (not the mean) of the devices' updates plus the noise."""
    seed = _check_seed(rotation_seed)
    if not isinstance(plan, DDGPlan):
        raise ValueError(f"plan must be a DDGPlan, got {type(plan).__name__}")
    a = _check_residues("total", total, plan.bits, plan.padded_dimension)
    half = 1 << (plan.bits - 1)
    centred = np.where(a >= half, a - plan.modulus, a).astype(np.float64)
    return (_unrotate(centred, seed) * plan.gamma)[: plan.dimension]


# --------------------------------------------------------------------------------------------------
# accountant


def _tau(local_stddev: float, shares: int) -> float:
    """Kairouz et al. Theorem 1: tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1)), the
    distance of a sum of n discrete Gaussians (integer std sigma each) from one discrete Gaussian."""
    if shares < 2:
        return 0.0
    k = np.arange(1, shares, dtype=np.float64)
    return 10.0 * float(np.sum(np.exp(-2.0 * (math.pi * local_stddev) ** 2 * k / (k + 1.0))))


def _check_survivors(plan: DDGPlan, survivors: object) -> int:
    return _integer("survivors", survivors, low=1, high=plan.expected_clients)


def ddg_rdp(plan: DDGPlan, survivors: int, orders: Sequence[float]) -> np.ndarray:
    """RDP of ONE round whose sum holds `survivors` noise shares (<= expected_clients; dropouts weaken the
    noise), per Kairouz et al. (their Theorem on the sum of n discrete Gaussians and the sensitivity of
    the conditionally rounded, rotated update, with its tau term). Add/remove one device
    (its update present or zeroed, the `survivors` shares in the sum either way; module docstring).

    Proposition 14 (Eq. 17) of arXiv 2102.06387 with m = survivors shares of integer std sigma,
    L2/L1 sensitivities D2, D1 of the rounded vector (plan.rounded_l2_bound / rounded_l1_bound) and
    dimension d = padded_dimension: with s2 = D2 / (sqrt(m) sigma), s1 = D1 / (sqrt(m) sigma),
    RDP(a) = min(a/2 s2^2 + tau d, a/2 (s2^2 + 2 s1 tau + tau^2 d), a/2 (s2 + sqrt(d) tau)^2).
    """
    if not isinstance(plan, DDGPlan):
        raise ValueError(f"plan must be a DDGPlan, got {type(plan).__name__}")
    m = _check_survivors(plan, survivors)
    a = np.asarray(orders, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 1.0):
        raise ValueError(f"orders must be a non-empty sequence of finite numbers > 1, got {orders!r}")
    if plan.local_stddev == 0.0:
        return np.full(a.shape, math.inf)
    d = plan.padded_dimension
    tau = _tau(plan.local_stddev, m)
    denom = math.sqrt(m) * plan.local_stddev
    s2, s1 = plan.rounded_l2_bound / denom, plan.rounded_l1_bound / denom
    t1 = a / 2.0 * s2**2 + tau * d
    t2 = a / 2.0 * (s2**2 + 2.0 * s1 * tau + tau**2 * d)
    t3 = a / 2.0 * (s2 + math.sqrt(d) * tau) ** 2
    return np.minimum(np.minimum(t1, t2), t3)


def _subsampled(base: np.ndarray, q: float, orders: Sequence[int]) -> np.ndarray:
    """Zhu & Wang (2019) Theorem 5 for Poisson subsampling at rate q, integer orders a >= 2:
    (a-1) eps'(a) <= log[ (1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^{eps(2)}
                          + 3 sum_{l=3}^{a} C(a,l) q^l (1-q)^(a-l) e^{(l-1) eps(l)} ],
    evaluated in log space. base[l] = eps(l) of the unsampled mechanism for l = 0..max(orders)."""
    lq, l1q = math.log(q), math.log1p(-q)
    out = np.empty(len(orders))
    for i, a in enumerate(orders):
        l = np.arange(2, a + 1, dtype=np.float64)
        log_comb = gammaln(a + 1.0) - gammaln(l + 1.0) - gammaln(a - l + 1.0)
        terms = log_comb + l * lq + (a - l) * l1q + (l - 1.0) * base[2 : a + 1]
        terms[1:] += math.log(3.0)
        head = (a - 1.0) * l1q + math.log(a * q - q + 1.0)
        out[i] = logsumexp(np.concatenate(([head], terms))) / (a - 1.0)
    return out


@functools.lru_cache(maxsize=1024)
def _round_rdp(plan: DDGPlan, survivors: int, sample_rate: float) -> np.ndarray:
    plain = ddg_rdp(plan, survivors, RDP_ORDERS)
    if sample_rate == 1.0 or not np.all(np.isfinite(plain)):
        curve = plain
    else:
        top = max(RDP_ORDERS)
        base = np.zeros(top + 1)
        base[2:] = ddg_rdp(plan, survivors, range(2, top + 1))
        curve = np.minimum(_subsampled(base, sample_rate, RDP_ORDERS), plain)
    curve.setflags(write=False)
    return curve


def ddg_epsilon(rounds: Sequence[tuple[DDGPlan, int, float]], delta: float) -> float:
    """Epsilon at delta after composing rounds, each (plan, survivors, sample_rate); sample_rate < 1 uses
    amplification by Poisson subsampling for RDP (Zhu & Wang 2019 upper bound for integer orders, as the
    reference does); sample_rate == 1 composes without it. Convert RDP->(eps, delta) with the same
    conversion the reference uses (or dp_accounting's).

    Orders are RDP_ORDERS (2..128 and 256, the reference's). The conversion is dp_accounting's
    ``compute_epsilon`` (Canonne-Kamath-Steinke Proposition 12), identical to the
    tensorflow_privacy ``get_privacy_spent`` that the reference calls. No rounds -> 0.0.
    """
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    dl = _real("delta", delta, low=0.0, low_ok=False, high=1.0)
    total = np.zeros(len(RDP_ORDERS))
    count = 0
    for i, item in enumerate(rounds):
        if not isinstance(item, tuple) or len(item) != 3:
            raise ValueError(f"rounds[{i}] must be a (plan, survivors, sample_rate) tuple, got {item!r}")
        plan, survivors, q = item
        if not isinstance(plan, DDGPlan):
            raise ValueError(f"rounds[{i}][0] must be a DDGPlan, got {type(plan).__name__}")
        m = _check_survivors(plan, survivors)
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 < float(q) <= 1.0:
            raise ValueError(f"rounds[{i}] sample_rate must be in (0, 1], got {q!r}")
        rate = float(q)
        total = total + _round_rdp(plan, m, rate)
        count += 1
    if count == 0:
        return 0.0
    if not np.all(np.isfinite(total)):
        return math.inf
    eps, _ = compute_epsilon(list(RDP_ORDERS), total.tolist(), dl)
    return float(eps)
