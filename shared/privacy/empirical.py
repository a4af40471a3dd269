"""`avrec audit empirical`: the one-run privacy audit of Steinke, Nasr and Jagielski (NeurIPS 2023), a
multi-run size audit, and what either can and cannot show.

One-run audit. m canaries are each included independently with probability 1/2; after one training run each
gets a score; the auditor guesses "in" for the highest scores (and, in the two-sided design, "out" for the
lowest) and abstains on the rest. If the training is (eps, delta)-DP, r guesses contain v or more correct
ones with probability at most p(eps) = P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha (their
Theorem 3.1 with delta; alpha as in their Algorithm). The lower bound is the largest eps with p(eps) <= 0.05
(Bonferroni over the guess counts fixed in advance): a claimed epsilon below it is refuted at 95%
confidence. An audit can falsify a claim, never prove it.

What the bound can reach (measured with the functions below; 95% confidence, all guesses right):
- delta = 0: with r guesses all right the bound is log(Q / (1 - Q)), Q = c^(1/r) (c the confidence level
  after Bonferroni), about log(r / log(1/c)): it grows only with the log of the number of guesses. 1,000
  all-right guesses certify 5.81 (one guess count), 10,000 certify 8.11, 50,000 certify 9.72; certifying
  epsilon 16 would take about log(1/c) e^16, some 27 million canaries, all guessed right.
- delta > 0: the term 2 m delta alpha grows with m, and for all-right guesses alpha is about
  P[Binomial(r, Q) = r - 1] ~ r e^-eps Q^(r-1) near the bound, so it caps the bound however many canaries
  are added. For a fixed m the best is to guess on every canary (r = m; fewer guesses only lose, the delta
  term still counts all m canaries), and over m the bound rises to a peak and then falls. At delta = 1e-5,
  one guess count r = m: 1,000 canaries certify 5.78, 10,000 certify 7.83, 30,000 certify 8.24 (the peak),
  50,000 only 8.20. Two counts (m/2, m) (Bonferroni 2): 5.56, 7.45, 7.54 at 15,000 (their peak), 7.43 at
  50,000. The first version's six counts (20 .. 1000) certify 5.27 at 1,000 canaries and less with more
  (4.07 at 10,000: its largest count stays 1,000 while the delta term grows). At the user level's delta
  = 1e-4 the peak is 5.85 (one count, 5,000 canaries). So at delta 1e-5 NO one-run audit of this kind, with
  any number of canaries, refutes a claim above ~8.2, and the claims of 16-18 that record-level runs print
  are out of reach of every design tried here; a multi-run distinguisher is no way out, since it needs a
  false-positive rate below e^-eps, i.e. ~e^eps log(1/0.025) runs per side (33 million at eps = 16). What an
  audit can do is test the run's mechanism on fewer steps (a prefix of the run, e.g. its first rounds),
  whose claim is lower: `audit_run` does that, and says which prefix and which claim.
- All-right guesses must be possible: two-sided guesses put k/2 "in" and k/2 "out", which needs k/2 <= both
  the present and the absent count (Binomial(m, 1/2)), so the designs here use k <= m - 3 sqrt(m): 1,000
  canaries -> counts (452, 905), certifiable 5.46; 10,000 -> 7.42 (two counts) or 7.80 (one).
- Poisson sampling: a canary present but never sampled in any step is indistinguishable from an absent
  one, so "out" guesses are right only if every present canary was sampled (expected misses
  m/2 (1 - q)^T). Where misses are expected the design guesses only "in" (the top scores), at most about
  m/2 (1 - (1 - q)^T) of them, which lowers the certifiable maximum; `guess_design` chooses from public
  parameters alone, before the run.

`largest_certifiable_epsilon` is the bound an audit would report if every guess at its best guess count
were right: a claim at or above it cannot be refuted by that audit, so a "pass" there means nothing.
`plan_canaries` picks the canary count and guess counts so that it exceeds a claim by a margin.

The audits, each on avrec's real code path:
- record level, DP-SGD (white-box gradient canaries): a real Opacus DP-SGD run of avrec's two-tower model
  through `client.trainer.train_local`; each present canary is Poisson-sampled into each step like an
  example and contributes the per-sample gradient C * u_i (u_i a unit direction over the trainable
  parameters), appended to Opacus's per-sample gradients before clipping and noise; score = <-B (theta_T -
  theta_0) / lr - (the real examples' clipped gradients summed over the steps), u_i>. Subtracting what the
  white-box auditor knows (the real examples' batches and clipped gradients) is valid, since the subsampled
  Gaussian's analysis holds for any fixed contribution of the other examples, and it matters: on a small
  model the real gradients' projections were larger than a canary's own signal (noise switched off: 488 of
  500 guesses right without the subtraction, all with it; noise cut tenfold: lower bound 2.8 before, 4.5
  after).
- record level, history release: canary rows (orthonormal unit vectors of the content space, sensitivity
  1 like every history row) added to the history sum `client.history.release_history` noises; score =
  <release - the user's exact sum, u_i>.
- record level, size (multi-run): `train_local` K times on n interactions and K times on n + 1; the squared
  norm of the shared update is thresholded (threshold and direction from separate calibration runs) and
  the true and false positive rates' Clopper-Pearson bounds give eps >= log((TPR_low - delta) / FPR_high).
  It catches a noise scale that depends on the data (the n-leak, NOTES 6); `leaky_divisor=True` is fault
  injection that puts the old Opacus divisor int(n q), q = 1 / ceil(n / batch-size), back through the
  `after_backward` hook (never in production code).
- user level (canary clients, Andrew et al. ICLR 2024): present canary clients send the update C * u_i in
  every round they are sampled, through `server.aggregate.aggregate` (DP-FedAvg's clip check, noise and
  fixed denominator), or under SecAgg+ through Flower's quantisation arithmetic and `noised_mean` (claim: the
  effective noise multiplier the run accounts); score = <sum of the aggregated deltas, u_i>. The other
  clients' updates are random vectors of norm up to C: the audit concerns the mechanism, which treats every
  update alike, and are subtracted from the scores like the real examples at record level. Trust model
  `secure` (distributed discrete Gaussian, `audit_secure_rounds`): every client, absent canaries with a zero
  update, sends its `noised_share` each round and the server's modular sum is decoded (`SecureRound`); the
  claim is `ddg_epsilon` of exactly the audited rounds' plan and share count, without amplification.

`audit_run` (`avrec audit empirical RUN_DIR`) reads the run's configuration and audits, with the run's own
model and content, each mechanism on the longest prefix of the run (whole rounds, else steps of one round)
whose claim plus `margin` the planned canaries could certify, and says so; the whole run's claim is
reported with the largest epsilon any one run could certify for it.

`noise_fraction` breaks the training on purpose (the mechanism runs with that fraction of the noise the
ledger claims) to show that the audit catches it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import secrets
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from scipy import stats

from shared.errors import RunFileError, read_json

from .accounting import SampledGaussian, epsilon_checked

CONFIDENCE = 0.05
GUESS_COUNTS = (20, 50, 100, 200, 500, 1000)  # the first version's fixed design (two-sided, Bonferroni over six)
CANARY_GRID = (1000, 2000, 5000, 10_000, 15_000, 20_000, 30_000, 50_000)
CANARY_CAP = 50_000  # plan_canaries's default cap
RUN_CANARY_CAP = 10_000  # `audit_run`'s default: 1.5 GB peak at the ML-100K model's 51k parameters
MARGIN = 1.0  # a plan is feasible when all-right guesses would certify the claim plus this
SIZE_MARGIN = 0.5
SIZE_CAP = 3000  # test runs per side at most in the size audit
OUTPUT = "empirical-audit.json"


# ------------------------------------------------------------------------------------------ the test


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (eps, delta)-DP, m canaries (Steinke et al. 2023)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))
    # delta's contribution: the largest average of P[v - i <= Binomial(r, q) < v] per unit i
    if v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    alpha = float(np.max(np.cumsum(stats.binom.pmf(v - i, r, q)) / i))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest eps whose p-value is below `confidence` (0 if none): bisection to 1e-4."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= confidence:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < confidence:
        lo, hi = hi, hi * 2
        if hi > 100:
            return math.inf
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < confidence else (lo, mid)
    return lo


def largest_certifiable_epsilon(m: int, delta: float, guess_counts: Sequence[int],
                                confidence: float = CONFIDENCE) -> float:
    """The bound the audit reports if every guess at its best guess count is right: each count at
    `confidence / len(counts)` (Bonferroni over the counts fixed in advance, as `audit_scores` tests)."""
    counts = [int(k) for k in guess_counts if 0 < k <= m]
    if not counts:
        return 0.0
    return max(epsilon_lower_bound(m, k, k, delta, confidence / len(counts)) for k in counts)


@dataclass(frozen=True)
class GuessDesign:
    """Guess counts fixed before the run. Two-sided: k/2 "in" at the top and k/2 "out" at the bottom;
    positive-only: k "in" at the top (where present canaries may never have been sampled)."""

    counts: tuple[int, ...]
    positive_only: bool = False

    def describe(self) -> str:
        side = "'in' for the top k only" if self.positive_only else "'in' for the top k/2, 'out' for the bottom k/2"
        return f"k in {list(self.counts)}, {side}"


def inclusion_probability(sample_rate: float, steps: int) -> float:
    """Probability that a present canary is sampled in at least one of `steps` Poisson draws."""
    return 1.0 - (1.0 - sample_rate) ** steps


def guess_design(m: int, inclusion: float = 1.0, counts: int = 2) -> GuessDesign:
    """Two-sided when fewer than half a present canary is expected to be missed by the sampling, else
    positive-only. The largest count is one that all-right guesses can fill: 3 standard deviations below
    what the coin flips give (two-sided: k/2 "in" and k/2 "out" need k/2 <= both the present and the absent
    count, so k <= m - 3 sqrt(m); positive-only: k <= the sampled present canaries). Guess counts
    (top / 2, top), or (top,) alone where `counts` = 1 (a higher ceiling, no fallback if a few guesses are
    wrong). From public parameters only."""
    missed = m / 2 * (1.0 - inclusion)
    if missed < 0.5:
        top, positive_only = int(m - 3 * math.sqrt(m)), False
    else:
        mean = m * inclusion / 2
        top, positive_only = int(mean - 3 * math.sqrt(mean * (1 - inclusion / 2))), True
    ladder = (top // 2, top) if counts == 2 else (top,)
    return GuessDesign(tuple(sorted({k for k in ladder if k > 0})), positive_only)


@dataclass(frozen=True)
class CanaryPlan:
    claimed_epsilon: float
    delta: float
    canaries: int
    design: GuessDesign
    certifiable: float  # largest_certifiable_epsilon of this plan
    feasible: bool  # certifiable >= claimed + margin
    message: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["design"] = {"counts": list(self.design.counts), "positive_only": self.design.positive_only}
        return d


def plan_canaries(claimed_eps: float, delta: float, inclusion: float = 1.0, cap: int = CANARY_CAP,
                  margin: float = MARGIN, confidence: float = CONFIDENCE,
                  grid: Sequence[int] = CANARY_GRID) -> CanaryPlan:
    """The fewest canaries (from `grid`, at most `cap`) whose design can certify `claimed_eps + margin`;
    if none can, the count with the largest certifiable epsilon and a message saying the claim is out of
    reach of one run."""
    sizes = sorted({m for m in grid if m <= cap} | {int(cap)})
    best: tuple[float, int, GuessDesign] | None = None
    for m in sizes:
        for counts in (2, 1):  # two guess counts where they reach; one count has the higher ceiling
            design = guess_design(m, inclusion, counts)
            cert = largest_certifiable_epsilon(m, delta, design.counts, confidence)
            if best is None or cert > best[0]:
                best = (cert, m, design)
            if math.isfinite(claimed_eps) and cert >= claimed_eps + margin:
                return CanaryPlan(claimed_eps, delta, m, design, cert, True,
                                  f"{m:,} canaries ({design.describe()}) can certify up to {cert:.2f}, above the "
                                  f"claim {claimed_eps:.2f} + margin {margin:g}")
    cert, m, design = best
    if not math.isfinite(claimed_eps):
        why = f"the claimed epsilon is infinite (no noise): there is nothing to refute"
    else:
        why = (f"one run cannot refute epsilon {claimed_eps:.2f} at delta {delta:g} with <= {cap:,} canaries: the "
               f"largest certifiable is {cert:.2f} ({m:,} canaries, {design.describe()})")
        if cert > claimed_eps:
            why += f"; within {margin:g} of the claim, so only a near-perfect score could refute it"
    return CanaryPlan(claimed_eps, delta, m, design, cert, False, why)


def audit_scores(scores: np.ndarray, present: np.ndarray, delta: float,
                 design: GuessDesign | Sequence[int] = GUESS_COUNTS) -> dict[str, Any]:
    """Guess at each count fixed in advance (see `GuessDesign`) and keep the best bound, each count at
    confidence 0.05 / (number of counts) (Bonferroni over the counts tried)."""
    if not isinstance(design, GuessDesign):
        design = GuessDesign(tuple(design))
    scores, present = np.asarray(scores, dtype=float), np.asarray(present, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    counts = [k for k in design.counts if 0 < k <= m]
    for k in counts:
        if design.positive_only:
            correct = int(present[order[:k]].sum())
        else:
            top, bottom = order[: k // 2], order[m - (k - k // 2):]
            correct = int(present[top].sum() + (~present[bottom]).sum())
        bound = epsilon_lower_bound(m, k, correct, delta, CONFIDENCE / len(counts))
        if bound > best["epsilon_lower_bound"] or not best["guesses"]:
            best = {"epsilon_lower_bound": bound, "guesses": k, "correct": correct}
    return {"canaries": m, "confidence": 1 - CONFIDENCE, "guess_counts": counts,
            "positive_only": design.positive_only,
            "certifiable_epsilon": largest_certifiable_epsilon(m, delta, counts), **best}


# ------------------------------------------------------------------------------------------ canaries


def _random_units(m: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """m random unit directions, orthonormal where dim >= m (no canary then leaks into another's score)."""
    u = torch.randn(m, dim, generator=generator)
    if dim >= m:
        return torch.linalg.qr(u.T.double())[0].T.float().contiguous()
    return u / u.norm(dim=1, keepdim=True)


class Canaries:
    """m unit directions in R^dim. Dense (orthonormal by QR where dim >= m) while m * dim is small; else
    sparse with disjoint random supports of dim // m coordinates and random signs: exactly orthonormal and
    never held as an m x dim matrix."""

    def __init__(self, m: int, dim: int, generator: torch.Generator, dense_limit: int = 20_000_000) -> None:
        self.m, self.dim = int(m), int(dim)
        self.dense: torch.Tensor | None = None
        if m * dim <= dense_limit or m > dim:
            if m * dim > 8 * dense_limit:
                raise ValueError(f"{m:,} canaries in {dim:,} dimensions: more canaries than dimensions and too "
                                 "large to hold densely; use fewer canaries")
            self.dense = _random_units(self.m, self.dim, generator)
            return
        per = dim // m
        self.support = torch.randperm(dim, generator=generator)[: m * per].reshape(m, per)
        signs = torch.randint(0, 2, (m, per), generator=generator).float() * 2 - 1
        self.values = signs / math.sqrt(per)

    def rows(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        if self.dense is not None:
            return self.dense[idx]
        out = torch.zeros(len(idx), self.dim)
        return out.scatter_(1, self.support[idx], self.values[idx])

    def project(self, vector: torch.Tensor) -> np.ndarray:
        """<vector, u_i> for every canary."""
        vector = vector.reshape(-1)
        if self.dense is not None:
            return (self.dense.double() @ vector.double()).numpy()
        return (vector.double()[self.support] * self.values.double()).sum(1).numpy()


def _coin_flips(m: int) -> np.ndarray:
    return np.random.default_rng(secrets.randbits(128)).random(m) < 0.5


@contextlib.contextmanager
def _quiet():
    """One torch thread (these small steps ran 6x slower with two threads on two shared cores), and without
    Opacus's notices on every step (empty first batch, backward hooks): stated in the docs instead."""
    logger = logging.getLogger("opacus.data_loader")
    level, threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield
    finally:
        logger.setLevel(level)
        torch.set_num_threads(threads)


def _calm(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _quiet():
            return fn(*args, **kwargs)
    return run


def _content(n_items: int, dim: int, generator: torch.Generator):
    from shared.features import ItemContent

    feats = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=generator), dim=-1)
    return ItemContent({"text": feats}, torch.ones(n_items, 1), 0, 0.0)


def random_unit_content(n_items: int, dims: dict[str, int], generator: torch.Generator):
    """Random unit content rows of the given shapes (when the run's own content cannot be loaded)."""
    from shared.features import ItemContent

    feats = {k: torch.nn.functional.normalize(torch.randn(n_items, d, generator=generator), dim=-1)
             for k, d in dims.items()}
    return ItemContent(feats, torch.ones(n_items, len(dims)), 0, 0.0)


def _claim(events: Sequence[SampledGaussian], delta: float) -> float:
    return epsilon_checked(list(events), delta).epsilon


def verdict(result: dict[str, Any]) -> str:
    lb, claim = result["epsilon_lower_bound"], result["claimed_epsilon"]
    cert = result.get("certifiable_epsilon", math.inf)
    if lb > claim:
        return "CLAIM REFUTED: the lower bound exceeds the claimed epsilon"
    if cert <= claim:
        return (f"NOT TESTED: this audit cannot certify more than {cert:.2f}, at or below the claim, so passing it "
                "means nothing")
    return (f"consistent with the claim (this audit could have certified up to {cert:.2f}; an audit can refute a "
            "claim, never prove it)")


# ------------------------------------------------------------------------------------ record level


@dataclass
class GradientCanaries:
    """Called by `train_local` between backward and step: appends the sampled canaries' per-sample gradients
    to Opacus's, so they are clipped, summed and noised with the real examples. It also adds up the real
    examples' clipped gradients (Opacus's clip factor C / (norm + 1e-6), at most 1), which the white-box
    auditor subtracts from the scores: revealing the real examples' batches and gradients costs the canaries
    nothing (the subsampled Gaussian's analysis holds for any fixed contribution of the others)."""

    canaries: Canaries
    present: np.ndarray  # (m,) bool
    sample_rate: float
    clip_norm: float
    noise_fraction: float = 1.0
    claimed_sigma: float | None = None
    params: list | None = None  # the optimizer's parameters, in its order (the canary vector's layout)
    lrs: list | None = None
    real: torch.Tensor | None = None  # sum over steps of the real examples' clipped gradients, flat

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(secrets.randbits(128))

    def __call__(self, optimizer) -> None:
        if self.claimed_sigma is None:
            self.claimed_sigma = optimizer.noise_multiplier
            optimizer.noise_multiplier = self.claimed_sigma * self.noise_fraction  # the deliberate bug, if any
            self.params = list(optimizer.params)
            lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
            self.lrs = [lr[id(p)] for p in self.params]
            self.real = torch.zeros(self.canaries.dim, dtype=torch.float64)
        samples = [p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in self.params]
        norms = torch.stack([g.norm(2, dim=1) for g in samples], dim=1).norm(2, dim=1)
        factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        self.real += torch.cat([torch.einsum("i,ij->j", factor.to(g.dtype), g).double() for g in samples])
        draw = self._rng.random(len(self.present)) < self.sample_rate
        rows = self.canaries.rows(np.flatnonzero(self.present & draw)) * self.clip_norm
        offset = 0
        for p in self.params:
            n = p.numel()
            extra = rows[:, offset: offset + n].reshape(-1, *p.shape).to(p.grad_sample.dtype)
            p.grad_sample = torch.cat([p.grad_sample, extra])
            offset += n


def trainable_dim(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@_calm
def audit_dp_sgd(model, train_items: np.ndarray, history: torch.Tensor, cfg, canaries: int, delta: float,
                 noise_fraction: float = 1.0, generator: torch.Generator | None = None,
                 design: GuessDesign | None = None) -> dict[str, Any]:
    """White-box gradient canaries in one device's DP-SGD (`train_local` with `cfg`'s rate, steps, divisor,
    noise and clip) on `train_items`; the claim is that of exactly the steps run."""
    from client.trainer import train_local

    generator = generator or torch.Generator().manual_seed(secrets.randbits(62))
    rate, steps = cfg.record_sample_rate, cfg.record_steps
    design = design or guess_design(canaries, inclusion_probability(rate, steps))
    directions = Canaries(canaries, trainable_dim(model), generator)
    present = _coin_flips(canaries)
    injector = GradientCanaries(directions, present, rate, cfg.clip_norm, noise_fraction)
    before = {id(p): p.detach().clone() for p in model.parameters() if p.requires_grad}
    result = train_local(model, train_items, history, cfg, secrets.randbits(62), dp=True, after_backward=injector)
    if injector.params is None:
        raise RuntimeError("no DP-SGD step sampled an example: nothing was audited")
    # theta_T - theta_0 = -lr / B * sum over steps of (clipped real + clipped canaries + noise), per group's lr
    moved = torch.cat([((p.detach() - before[id(p)]).double() / lr).reshape(-1)
                       for p, lr in zip(injector.params, injector.lrs)])
    scores = directions.project(-moved * cfg.batch_size - injector.real)
    claimed = _claim([SampledGaussian(cfg.noise_multiplier, rate, result.steps)], delta)
    return {"level": "record", "mechanism": "dp-sgd", "claimed_epsilon": claimed, "delta": delta,
            "noise_multiplier_claimed": cfg.noise_multiplier, "noise_fraction_run": noise_fraction,
            "sample_rate": rate, "steps": result.steps, "divisor": cfg.batch_size, "clip_norm": cfg.clip_norm,
            "examples": int(len(train_items)), "parameters": directions.dim,
            **audit_scores(scores, present, delta, design)}


def record_level(canaries: int = 1000, noise_fraction: float = 1.0, seed: int = 0, examples: int = 200,
                 noise_multiplier: float = 2.0, steps: int = 104, sample_rate: float = 1 / 13, delta: float = 1e-5,
                 embedding_dim: int = 64) -> dict[str, Any]:
    """Synthetic set-up: white-box gradient canaries in one device's DP-SGD on random content."""
    from shared.config import RunConfig
    from shared.model import build_model

    g = torch.Generator().manual_seed(seed)
    cfg = RunConfig(dp="record", noise_multiplier=noise_multiplier, record_steps=steps, record_sample_rate=sample_rate,
                    embedding_dim=embedding_dim)
    content = _content(300, 32, g)
    torch.manual_seed(seed)
    model = build_model(content, 300, cfg)
    items = torch.randint(0, 300, (examples,), generator=g).numpy()
    history = torch.nn.functional.normalize(torch.randn(1, 32, generator=g), dim=-1)
    return audit_dp_sgd(model, items, history, cfg, canaries, delta, noise_fraction, g)


def audit_history_release(item_rows: torch.Tensor, train_items: np.ndarray, sigma: float, canaries: int,
                          delta: float, noise_fraction: float = 1.0, generator: torch.Generator | None = None
                          ) -> dict[str, Any]:
    """Canary rows (orthonormal unit vectors, as many as the content space allows) added to the history sum
    that `client.history.release_history` noises once; the claim is that of one release."""
    from client.history import release_history

    generator = generator or torch.Generator().manual_seed(secrets.randbits(62))
    dim = item_rows.shape[1]
    canaries = min(canaries, dim)
    directions = Canaries(canaries, dim, generator)
    present = _coin_flips(canaries)
    rows = torch.cat([item_rows.float(), directions.rows(np.arange(canaries)).float()])
    items = np.concatenate([np.asarray(train_items), item_rows.shape[0] + np.flatnonzero(present)]).astype(np.int64)
    noise = torch.Generator().manual_seed(secrets.randbits(62))
    released = release_history(rows, items, sigma * noise_fraction, noise)
    exact = item_rows[torch.as_tensor(np.asarray(train_items), dtype=torch.long)].sum(0)
    scores = directions.project(released - exact)  # the auditor knows the user's own rows
    claimed = _claim([SampledGaussian(sigma, 1.0, 1)], delta)
    return {"level": "record", "mechanism": "gaussian-history-release", "claimed_epsilon": claimed, "delta": delta,
            "noise_multiplier_claimed": sigma, "noise_fraction_run": noise_fraction, "releases": 1,
            "content_dim": dim, **audit_scores(scores, present, delta, guess_design(canaries))}


# --------------------------------------------------------------------------------- size (multi-run)


class LeakyDivisor:
    """FAULT INJECTION, for the size audit only (its tests and `avrec audit empirical --leaky-divisor`): divides
    by Opacus's own expected batch size int(n q), q = 1 / ceil(n / batch-size), as avrec did before the fix
    (NOTES 6), through `train_local`'s `after_backward` hook. Production code never uses it."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.divisor = int(n * (1.0 / math.ceil(n / batch_size)))

    def __call__(self, optimizer) -> None:
        optimizer.expected_batch_size = self.divisor


@dataclass
class NoiseFraction:
    """FAULT INJECTION: the run's noise multiplier times `fraction` (set once, at the first step)."""

    fraction: float
    done: bool = False

    def __call__(self, optimizer) -> None:
        if not self.done:
            optimizer.noise_multiplier *= self.fraction
            self.done = True


def _chain(*hooks):
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None

    def run(optimizer) -> None:
        for h in hooks:
            h(optimizer)
    return run


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided (lower, upper) bounds, each at level 1 - alpha, on a binomial proportion k / n."""
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
    return low, high


def rates_lower_bound(tp: int, fp: int, n: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """eps >= log((TPR_low - delta) / FPR_high), both Clopper-Pearson at confidence / 2 (union bound)."""
    tpr_low, _ = clopper_pearson(tp, n, confidence / 2)
    _, fpr_high = clopper_pearson(fp, n, confidence / 2)
    return max(0.0, math.log((tpr_low - delta) / fpr_high)) if tpr_low > delta else 0.0


def size_runs_needed(claimed: float, delta: float, margin: float = SIZE_MARGIN, cap: int = SIZE_CAP) -> int:
    """Test runs per side for which a perfect distinguisher would certify `claimed + margin` (or `cap`)."""
    n = 16
    while n < cap and rates_lower_bound(n, 0, n, delta) < claimed + margin:
        n = min(cap, int(n * 1.25) + 1)
    return n


def size_audit(cfg, content, n_catalogue: int, items: np.ndarray, n: int, history: torch.Tensor, runs: int,
               calibration: int = 20, delta: float | None = None, leaky_divisor: bool = False,
               seed: int = 0, noise_fraction: float = 1.0) -> dict[str, Any]:
    """`train_local` from the same initial weights `calibration + runs` times on the first n interactions
    (D) and as often on the first n + 1 (D'), alternating. Statistic: squared norm of the shared update.
    Direction and threshold (midpoint of the class means) come from the calibration runs; the other runs
    are guessed "D" above (or below) it, giving TP and FP out of `runs` each. Claim: one round of DP-SGD.
    `leaky_divisor` and `noise_fraction` < 1 are fault injection (`LeakyDivisor`, `NoiseFraction`)."""
    from client.trainer import train_local
    from shared.model import build_model, shared_state

    delta = cfg.delta if delta is None else delta
    items = np.asarray(items)
    if len(items) < n + 1:
        raise ValueError(f"need at least n + 1 = {n + 1} interactions, got {len(items)}")
    torch.manual_seed(seed)
    initial = {k: v.clone() for k, v in build_model(content, n_catalogue, cfg).state_dict().items()}
    started = time.perf_counter()

    def run(size: int) -> float:
        model = build_model(content, n_catalogue, cfg)
        model.load_state_dict(initial)
        before = {k: v.clone() for k, v in shared_state(model).items()}
        hook = _chain(LeakyDivisor(size, cfg.batch_size) if leaky_divisor else None,
                      NoiseFraction(noise_fraction) if noise_fraction != 1.0 else None)
        train_local(model, items[:size], history, cfg, secrets.randbits(62), dp=True, after_backward=hook)
        return float(sum(((v - before[k]).double() ** 2).sum() for k, v in shared_state(model).items()))

    stats_d, stats_d1 = [], []
    with _quiet():
        for _ in range(calibration + runs):
            stats_d.append(run(n))
            stats_d1.append(run(n + 1))
    cal_d, cal_d1 = np.array(stats_d[:calibration]), np.array(stats_d1[:calibration])
    sign = 1.0 if cal_d.mean() >= cal_d1.mean() else -1.0
    threshold = (cal_d.mean() + cal_d1.mean()) / 2
    test_d, test_d1 = np.array(stats_d[calibration:]), np.array(stats_d1[calibration:])
    tp = int((sign * (test_d - threshold) > 0).sum())
    fp = int((sign * (test_d1 - threshold) > 0).sum())
    claimed = _claim([SampledGaussian(cfg.noise_multiplier, cfg.record_sample_rate, cfg.record_steps)], delta)
    return {"level": "record", "mechanism": "dp-sgd (size: n vs n + 1 interactions)", "claimed_epsilon": claimed,
            "delta": delta, "n": n, "runs_per_side": runs, "calibration_runs_per_side": calibration,
            "true_positives": tp, "false_positives": fp, "tpr": tp / runs, "fpr": fp / runs,
            "statistic": "squared norm of the shared update", "leaky_divisor_fault_injected": leaky_divisor,
            "noise_fraction_run": noise_fraction,
            "sample_rate": cfg.record_sample_rate, "steps": cfg.record_steps, "divisor": cfg.batch_size,
            "noise_multiplier_claimed": cfg.noise_multiplier,
            "mean_statistic": {"n": float(test_d.mean()), "n+1": float(test_d1.mean())},
            "epsilon_lower_bound": rates_lower_bound(tp, fp, runs, delta),
            "certifiable_epsilon": rates_lower_bound(runs, 0, runs, delta),
            "confidence": 1 - CONFIDENCE, "seconds": round(time.perf_counter() - started, 1)}


def size_level(n: int = 19, runs: int = 600, calibration: int = 20, leaky_divisor: bool = False, seed: int = 0,
               noise_multiplier: float = 1.0, sample_rate: float = 0.5, steps: int = 2, batch_size: int = 10,
               embedding_dim: int = 64, content_dim: int = 384, n_items: int = 40,
               delta: float = 1e-5) -> dict[str, Any]:
    """Synthetic set-up of the size audit: random unit content, n vs n + 1 distinct interactions."""
    from shared.config import RunConfig

    g = torch.Generator().manual_seed(seed)
    cfg = RunConfig(dp="record", noise_multiplier=noise_multiplier, record_sample_rate=sample_rate,
                    record_steps=steps, batch_size=batch_size, embedding_dim=embedding_dim, delta=delta)
    content = _content(n_items, content_dim, g)
    items = torch.randperm(n_items, generator=g)[: n + 1].numpy()
    history = torch.nn.functional.normalize(torch.randn(1, content_dim, generator=g), dim=-1)
    return size_audit(cfg, content, n_items, items, n, history, runs, calibration, delta, leaky_divisor, seed)


# -------------------------------------------------------------------------------------- user level


def _random_update(dim: int, clip: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.randn(dim, generator=generator)
    return u / u.norm() * clip * float(torch.rand(1, generator=generator))


@_calm
def audit_user_rounds(reference: dict[str, torch.Tensor], canaries: int, *, rounds: int, clip: float,
                      noise_multiplier: float, claimed_noise_multiplier: float, fraction: float, population: int,
                      delta: float, noise_fraction: float = 1.0, secagg_bits: int | None = None,
                      generator: torch.Generator | None = None, design: GuessDesign | None = None) -> dict[str, Any]:
    """Canary clients among `population` others through `rounds` rounds of DP-FedAvg: clients are Poisson
    sampled at `fraction` (< 1) or all take part; `aggregate` (clip check, noise, fixed denominator), or
    with `secagg_bits` each update through Flower's SecAgg+ quantisation and the sum through `noised_mean`."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from server.aggregate import aggregate, noised_mean

    generator = generator or torch.Generator().manual_seed(secrets.randbits(62))
    names = list(reference)
    sizes = [reference[k].numel() for k in names]
    dim = sum(sizes)

    def unflat(vec: torch.Tensor, cast: bool = True) -> dict[str, torch.Tensor]:
        return {k: part.reshape(reference[k].shape).to(reference[k].dtype if cast else part.dtype)
                for k, part in zip(names, torch.split(vec, sizes))}

    sampled_rate = fraction if fraction < 1.0 else 1.0
    design = design or guess_design(canaries, inclusion_probability(sampled_rate, rounds))
    directions = Canaries(canaries, dim, generator)
    present = _coin_flips(canaries)
    rng = np.random.default_rng(secrets.randbits(128))
    total = torch.zeros(dim, dtype=torch.float64)
    sigma = noise_multiplier * noise_fraction
    levels = 2 ** secagg_bits if secagg_bits is not None else 0
    for _ in range(rounds):
        if fraction < 1.0:
            others = int((rng.random(population) < fraction).sum())
            chosen = np.flatnonzero(present & (rng.random(canaries) < fraction))
            denominator = fraction * (population + int(present.sum()))
        else:
            others, chosen = population, np.flatnonzero(present)
            denominator = float(population + len(chosen))

        known = torch.zeros(dim, dtype=torch.float64)  # the other clients' part of the sum: the auditor's own

        def updates() -> Iterator[tuple[str, torch.Tensor]]:
            for i in range(others):
                u = _random_update(dim, clip, generator)
                if secagg_bits is not None:  # what SecAgg+ sums: each device's update quantised, dequantised
                    u = torch.from_numpy(dequantize(quantize([u.double().numpy()], clip, levels), clip, levels)[0])
                known.add_(u.double())
                yield f"client {i}", u
            for i in chosen:
                u = directions.rows([i])[0] * clip * (1 - 1e-6)
                if secagg_bits is not None:
                    u = torch.from_numpy(dequantize(quantize([u.double().numpy()], clip, levels), clip, levels)[0])
                yield f"canary {i}", u

        if secagg_bits is None:
            result = aggregate(((s, unflat(u)) for s, u in updates()), reference, user_dp=True, clip_norm=clip,
                               noise_multiplier=sigma, expected_clients=denominator)
            if result.rejected:
                raise RuntimeError(f"the aggregator rejected audit updates: {result.rejected[:3]}")
            delta_round = result.delta
        else:
            summed = sum((u.double() for _, u in updates()), torch.zeros(dim, dtype=torch.float64))
            delta_round = noised_mean(unflat(summed, cast=False), reference, clip, sigma, denominator)
        total += torch.cat([delta_round[k].double().reshape(-1) for k in names]) - known / denominator
    # white-box: the other clients' updates are known to the auditor and subtracted (the DP claim holds for
    # any fixed updates of the others)
    scores = directions.project(total)
    claimed = _claim([SampledGaussian(claimed_noise_multiplier, sampled_rate, rounds)], delta)
    return {"level": "user", "claimed_epsilon": claimed, "delta": delta,
            "noise_multiplier_claimed": claimed_noise_multiplier, "noise_multiplier_configured": noise_multiplier,
            "noise_fraction_run": noise_fraction, "rounds": rounds, "fraction": sampled_rate,
            "population": population, "clip_norm": clip, "parameters": dim,
            **audit_scores(scores, present, delta, design)}


def user_level(canaries: int = 1000, noise_fraction: float = 1.0, seed: int = 0, rounds: int = 2,
               noise_multiplier: float = 2.0, other_clients: int = 50, delta: float = 1e-5) -> dict[str, Any]:
    """Synthetic set-up: canary clients with random update directions through DP-FedAvg, every client every
    round (no amplification)."""
    from shared.config import RunConfig
    from shared.model import build_model, shared_state

    g = torch.Generator().manual_seed(seed)
    cfg = RunConfig(dp="user", embedding_dim=16)
    reference = shared_state(build_model(_content(300, 32, g), 300, cfg))
    return audit_user_rounds(reference, canaries, rounds=rounds, clip=cfg.user_clip_norm,
                             noise_multiplier=noise_multiplier, claimed_noise_multiplier=noise_multiplier,
                             fraction=1.0, population=other_clients, delta=delta, noise_fraction=noise_fraction,
                             generator=g)


@_calm
def audit_secure_rounds(reference: dict[str, torch.Tensor], canaries: int, *, rounds: int, cfg, population: int,
                        delta: float, noise_fraction: float = 1.0, generator: torch.Generator | None = None,
                        design: GuessDesign | None = None) -> dict[str, Any]:
    """Canary clients among `population` others through `rounds` rounds of trust model `secure`: every update
    goes through the real path, `SecureRound.plan_round` (public plan and rotation seed), each device's
    `noised_share` (clip, rotate, round, its own discrete Gaussian share, mod 2^bits) and `SecureRound.aggregate`
    (check, modular sum, decode over the fixed denominator). Every client takes part in every round (no
    amplification claimed); an absent canary's device still sends a share of a zero update (its noise share
    counts), which is the mechanism's neighbouring relation (`distributed_dp.NEIGHBOURING`). The claim is the
    DDG accountant's for exactly these rounds: `ddg_epsilon([(plan, survivors, 1.0)] * rounds, delta)` with the
    claimed configuration's plan. With `noise_fraction` < 1 the devices and the server run a plan whose
    user-noise-multiplier is that fraction of the claimed one (fault injection)."""
    from server.secure_sum import SecureRound
    from shared.privacy.distributed_dp import ddg_epsilon
    from shared.privacy.distributed_dp import modular_sum
    from shared.secure import check_share, noised_share

    generator = generator or torch.Generator().manual_seed(secrets.randbits(62))
    names = list(reference)
    sizes = [reference[k].numel() for k in names]
    dim = sum(sizes)

    def unflat(vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: part.reshape(reference[k].shape).to(reference[k].dtype)
                for k, part in zip(names, torch.split(vec, sizes))}

    clip = cfg.user_clip_norm
    run_cfg = cfg
    if noise_fraction != 1.0:  # fault injection; a copy set directly, since the config rightly refuses noise 0
        run_cfg = copy.copy(cfg)
        object.__setattr__(run_cfg, "user_noise_multiplier", cfg.user_noise_multiplier * noise_fraction)
    design = design or guess_design(canaries, 1.0)
    directions = Canaries(canaries, dim, generator)
    present = _coin_flips(canaries)
    devices = population + canaries  # public: every device (canary slots included) sends a share every round
    zero = torch.zeros(dim)
    total = torch.zeros(dim, dtype=torch.float64)
    claimed_plan = survivors = None
    for _ in range(rounds):
        secure_round = SecureRound.plan_round(run_cfg, devices, reference)
        claimed_plan = SecureRound.plan_round(cfg, devices, reference).plan
        known = torch.zeros(dim, dtype=torch.float64)  # the other clients' part of the sum: the auditor's own

        def shares() -> Iterator[tuple[str, torch.Tensor]]:
            for i in range(population):
                u = _random_update(dim, clip, generator)
                known.add_(u.double())
                yield f"client {i}", noised_share(unflat(u), run_cfg, secure_round.expected, secure_round.rotation_seed)
            for i in range(canaries):
                u = directions.rows([i])[0] * clip * (1 - 1e-6) if present[i] else zero
                yield f"canary {i}", noised_share(unflat(u), run_cfg, secure_round.expected, secure_round.rotation_seed)

        # `SecureRound.aggregate`'s steps (check each share, sum modulo 2^bits, `decode`), the sum kept running
        # so that thousands of shares are never held at once
        summed, survivors = None, 0
        for source, share in shares():
            check_share(share, secure_round.plan, source)
            summed = modular_sum([share.numpy()] if summed is None else [summed, share.numpy()], secure_round.plan.bits)
            survivors += 1
        result = secure_round.decode(summed, survivors, reference)
        if result.rejected or result.delta is None:
            raise RuntimeError(f"the secure sum rejected audit shares: {result.rejected[:3]}")
        total += torch.cat([result.delta[k].double().reshape(-1) for k in names]) - known / secure_round.denominator
    # white-box: the other clients' updates are known to the auditor and subtracted (the DP claim holds for
    # any fixed updates of the others)
    scores = directions.project(total)
    claimed = ddg_epsilon([(claimed_plan, survivors, 1.0)] * rounds, delta)
    return {"level": "user", "claimed_epsilon": claimed, "delta": delta,
            "noise_multiplier_claimed": cfg.user_noise_multiplier,
            "noise_multiplier_configured": cfg.user_noise_multiplier, "noise_fraction_run": noise_fraction,
            "rounds": rounds, "fraction": 1.0, "population": population, "devices": devices, "survivors": survivors,
            "clip_norm": clip, "parameters": dim, "secure_bits": cfg.secure_bits,
            "local_stddev_claimed": claimed_plan.local_stddev, **audit_scores(scores, present, delta, design)}


def secure_user_level(canaries: int = 1000, noise_fraction: float = 1.0, seed: int = 0, rounds: int = 2,
                      noise_multiplier: float = 2.0, other_clients: int = 50, delta: float = 1e-5) -> dict[str, Any]:
    """Synthetic set-up of `user_level` under trust model `secure`: canary clients through the distributed
    discrete Gaussian's real device and server code, every client every round (no amplification)."""
    from shared.config import RunConfig
    from shared.model import build_model, shared_state

    g = torch.Generator().manual_seed(seed)
    cfg = RunConfig(dp="user", embedding_dim=16, trust_model="secure", user_noise_multiplier=noise_multiplier)
    reference = shared_state(build_model(_content(300, 32, g), 300, cfg))
    return audit_secure_rounds(reference, canaries, rounds=rounds, cfg=cfg, population=other_clients, delta=delta,
                               noise_fraction=noise_fraction, generator=g)


def run_empirical(level: str = "both", canaries: int = 1000, noise_fraction: float = 1.0, seed: int = 0,
                  log=print) -> dict[str, Any]:
    """The synthetic set-up (not a run's configuration): see `audit_run` for that."""
    out: dict[str, Any] = {}
    torch.set_num_threads(1)
    for name, audit in (("record", record_level), ("user", user_level)):
        if level in (name, "both"):
            r = audit(canaries=canaries, noise_fraction=noise_fraction, seed=seed)
            r["verdict"] = verdict(r)
            out[name] = r
            log(_line(f"{name} level (synthetic set-up)", r))
    return out


def _line(label: str, r: dict[str, Any]) -> str:
    broken = "" if r.get("noise_fraction_run", 1.0) == 1.0 else \
        f"; NOISE DELIBERATELY RUN AT {r['noise_fraction_run']:g} OF THE CLAIM"
    how = (f"{r['correct']}/{r['guesses']} guesses correct, {r['canaries']:,} canaries" if "canaries" in r else
           f"TP {r['true_positives']}/{r['runs_per_side']}, FP {r['false_positives']}/{r['runs_per_side']}")
    return (f"{label}: claimed epsilon {r['claimed_epsilon']:.3f} at delta {r['delta']:g}; empirical lower bound "
            f"{r['epsilon_lower_bound']:.3f} (95%, {how}); largest certifiable {r['certifiable_epsilon']:.3f}"
            f"{broken}: {r['verdict']}")


# ----------------------------------------------------------------------------------------- RUN mode


def load_run_config(run_dir: Path):
    """The run's configuration (federated.json's `config`, else summary.json's) and the rounds it ran."""
    from shared.config import from_flat

    for name in ("federated.json", "summary.json"):
        path = run_dir / name
        if path.exists():
            doc = read_json(path)
            if "config" in doc:
                fed = doc if name == "federated.json" else doc.get("federated", {})
                rounds = int(fed.get("rounds_run") or doc["config"].get("num-rounds") or 0)
                return from_flat(doc["config"]), rounds, name
    raise RunFileError(f"{run_dir}: neither federated.json nor summary.json holds the run's config (not a run "
                       "directory, or the run never finished a round)")


def _run_population(cfg, random_content: bool, generator: torch.Generator, log):
    """(content, n_items, train sequences of the run's users, note on the content)."""
    from shared.data.dataset import load_dataset
    from shared.data.resolve import resolve_dataset
    from shared.data.split import leave_one_out
    from shared.features import EncoderSettings, catalogue_shapes, load_cached

    settings = EncoderSettings.from_config(cfg)
    dataset_dir = resolve_dataset(cfg)
    content, note = None, "the run's own item content"
    started = time.perf_counter()
    if random_content:
        note = "random unit content rows of the run's shapes (--random-content)"
    else:
        try:
            dataset, content = load_cached(str(dataset_dir), cfg.modalities, cfg.cache_dir, settings)
        except Exception as exc:  # an encoder or media missing here: fall back, and say so
            note = (f"random unit content rows of the run's shapes (loading the content failed: "
                    f"{type(exc).__name__}: {exc})")
    if content is None:
        dataset = load_dataset(dataset_dir)
        n_items, dims = catalogue_shapes(dataset_dir, cfg.modality_list, settings)
        content = random_unit_content(n_items, dims, generator)
    split = leave_one_out(dataset, cfg.seed, cfg.eval_negatives, drop_short_users=cfg.drop_short_users)
    users = split.users[: cfg.max_users] if cfg.max_users else split.users
    log(f"avrec audit: {len(users)} users, {dataset.n_items} items, content "
        f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in content.features.items())} ({note}, "
        f"{time.perf_counter() - started:.1f} s)")
    return content, dataset.n_items, [u.train for u in users], note


def _prefix_plan(claim_of: Callable[[int], float], inclusion_of: Callable[[int], float], most: int, delta: float,
                 cap: int, margin: float) -> tuple[int, CanaryPlan]:
    """The largest prefix length (1 .. most) whose claim one run can certify with margin, and its plan; if
    none, length 1 and its (infeasible) plan. Lengths whose claim is above every design's ceiling are not
    planned (claims grow with the length)."""
    ceiling = max(largest_certifiable_epsilon(m, delta, guess_design(m, 1.0, 1).counts)
                  for m in sorted({m for m in CANARY_GRID if m <= cap} | {int(cap)}))
    chosen = None
    for length in range(1, most + 1):
        claim = claim_of(length)
        if claim + margin > ceiling:
            break
        plan = plan_canaries(claim, delta, inclusion_of(length), cap=cap, margin=margin)
        if plan.feasible:
            chosen = (length, plan)
    return chosen or (1, plan_canaries(claim_of(1), delta, inclusion_of(1), cap=cap, margin=margin))


def _whole_run(claim: float, delta: float, inclusion: float, log) -> dict[str, Any]:
    """Whether any one-run audit (up to CANARY_CAP canaries) could refute the run's whole claim: said plainly."""
    plan = plan_canaries(claim, delta, inclusion, cap=CANARY_CAP, margin=0.0)
    if plan.feasible:
        log(f"  the whole run's claim is within one-run reach with up to {CANARY_CAP:,} canaries and no margin "
            f"({plan.message}); the audit below keeps to its own cap and margin")
    else:
        log(f"  the whole run's claim is out of reach: {plan.message}; a multi-run test would need about "
            f"e^eps log(1/0.025) = {math.exp(min(claim, 700)) * math.log(40):.3g} runs per side. Audited instead:")
    return plan.as_dict()


def _record_audits(cfg, rounds: int, content, n_items: int, trains: list[np.ndarray], *, cap: int, margin: float,
                   size_runs: int | None, noise_fraction: float, leaky_divisor: bool, generator: torch.Generator,
                   log) -> dict[str, Any]:
    from client.history import release_history
    from shared.model import build_model

    q, per_round, sigma, delta = cfg.record_sample_rate, cfg.record_steps, cfg.noise_multiplier, cfg.delta
    releases = 1 + ((rounds - 1) // cfg.history_refresh_rounds if cfg.history_refresh_rounds else 0)
    run_claim = _claim([SampledGaussian(cfg.history_noise_multiplier, 1.0, releases),
                        SampledGaussian(sigma, q, per_round * rounds)], delta)
    lengths = sorted(len(t) for t in trains)
    median = lengths[len(lengths) // 2]
    train = next(t for t in trains if len(t) == median)
    out: dict[str, Any] = {"run_claimed_epsilon": run_claim, "run_rounds": rounds, "history_releases": releases,
                           "examples": median, "examples_note": "the median training length of the run's users "
                           "(DP-SGD's rate, steps and divisor do not depend on it)"}
    log(f"record level: the run claims epsilon {run_claim:.3f} at delta {delta:g} for a device in all {rounds} rounds "
        f"({releases} history release(s) at sigma {cfg.history_noise_multiplier:g}, {per_round * rounds} DP-SGD steps "
        f"at q {q:g}, sigma {sigma:g})")
    out["run_claim_plan"] = _whole_run(run_claim, delta, inclusion_probability(q, per_round * rounds), log)

    # DP-SGD: the most whole rounds the audit can test, else the most steps of one round
    claim_steps = lambda t: _claim([SampledGaussian(sigma, q, t)], delta)  # noqa: E731
    incl = lambda t: inclusion_probability(q, t)  # noqa: E731
    r_audit, plan = _prefix_plan(lambda r: claim_steps(r * per_round), lambda r: incl(r * per_round), rounds, delta,
                                 cap, margin)
    steps = r_audit * per_round
    if not plan.feasible and per_round > 1:
        t_audit, sub = _prefix_plan(claim_steps, incl, per_round - 1, delta, cap, margin)
        if sub.feasible:
            steps, plan, r_audit = t_audit, sub, 0
    scope = (f"the first {r_audit} of {rounds} rounds ({steps} steps)" if r_audit else
             f"{steps} of the {per_round} steps of one round")
    log(f"  DP-SGD audited on {scope}: {plan.message}")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = build_model(content, n_items, cfg)
    noise = torch.Generator().manual_seed(secrets.randbits(62))
    history = release_history(content.history_rows, train, cfg.history_noise_multiplier, noise)
    began = time.perf_counter()
    r = audit_dp_sgd(model, train, history, cfg.replace(record_steps=steps), plan.canaries, delta, noise_fraction,
                     generator, plan.design)
    r.update(audited=scope, audited_rounds=r_audit, plan=plan.as_dict(), seconds=round(time.perf_counter() - began, 1))
    r["verdict"] = verdict(r)
    out["dp_sgd"] = r
    log(_line("  record level, DP-SGD", r))

    # the history release: one release, canaries in the content space
    h_claim = _claim([SampledGaussian(cfg.history_noise_multiplier, 1.0, 1)], delta)
    h_dim = content.history_rows.shape[1]
    h_plan = plan_canaries(h_claim, delta, 1.0, cap=h_dim, margin=margin, grid=(h_dim,))
    r = audit_history_release(content.history_rows, train, cfg.history_noise_multiplier, h_plan.canaries, delta,
                              noise_fraction, generator)
    r.update(audited=f"one release of {releases}", plan=h_plan.as_dict())
    r["verdict"] = verdict(r)
    out["history_release"] = r
    log(_line("  record level, history release", r))

    # size: one round, median n vs n + 1
    one_round = claim_steps(per_round)
    runs = size_runs_needed(one_round, delta) if size_runs is None else size_runs
    if runs > 0:
        extra = np.setdiff1d(np.arange(n_items), train)[:1]
        items = np.concatenate([train, extra])
        r = size_audit(cfg, content, n_items, items, median, history, runs, delta=delta,
                       seed=int(torch.randint(0, 2**31, (1,), generator=generator)), noise_fraction=noise_fraction,
                       leaky_divisor=leaky_divisor)
        r.update(audited="one round")
        r["verdict"] = verdict(r)
        out["size"] = r
        log(_line(f"  record level, size ({median} vs {median + 1} interactions, multi-run)", r))
    return out


def _user_audit(cfg, rounds: int, content, n_items: int, population: int, *, cap: int, margin: float,
                noise_fraction: float, generator: torch.Generator, log) -> dict[str, Any]:
    from shared.model import build_model, shared_state
    from shared.privacy.secagg_plan import effective_noise_multiplier, plan as secagg_plan

    delta, clip, sigma = cfg.user_delta, cfg.user_clip_norm, cfg.user_noise_multiplier
    if cfg.trust_model == "secure":
        return _secure_user_audit(cfg, rounds, content, n_items, population, cap=cap, margin=margin,
                                  noise_fraction=noise_fraction, generator=generator, log=log)
    reference = shared_state(build_model(content, n_items, cfg))
    dim = sum(v.numel() for v in reference.values())
    secagg = cfg.secure_aggregation
    fraction = 1.0 if secagg else cfg.fraction_train
    claimed_sigma = sigma
    if secagg:
        claimed_sigma = effective_noise_multiplier(sigma, secagg_plan(1, cfg.secagg_quantization_bits, clip), dim)
    per_client = rounds
    if cfg.max_rounds_per_client and fraction >= 1.0:
        per_client = min(rounds, cfg.max_rounds_per_client)
    rate = fraction if fraction < 1.0 else 1.0
    claim_rounds = lambda r: _claim([SampledGaussian(claimed_sigma, rate, r)], delta)  # noqa: E731
    run_claim = claim_rounds(per_client)
    trust = "central, SecAgg+ (the server sees only the sum)" if secagg else "central (DP-FedAvg)"
    log(f"user level ({trust}): the run claims epsilon {run_claim:.3f} at delta {delta:g} for a client in {per_client} "
        f"rounds (noise multiplier {claimed_sigma:.4g} accounted, fraction {fraction:g}, {population} clients)")
    whole = _whole_run(run_claim, delta, inclusion_probability(rate, per_client), log)
    r_audit, plan = _prefix_plan(claim_rounds, lambda r: inclusion_probability(rate, r), per_client, delta, cap, margin)
    scope = f"the first {r_audit} of {per_client} rounds"
    log(f"  audited on {scope}: {plan.message}")
    began = time.perf_counter()
    r = audit_user_rounds(reference, plan.canaries, rounds=r_audit, clip=clip, noise_multiplier=sigma,
                          claimed_noise_multiplier=claimed_sigma, fraction=fraction, population=population,
                          delta=delta, noise_fraction=noise_fraction,
                          secagg_bits=cfg.secagg_quantization_bits if secagg else None, generator=generator,
                          design=plan.design)
    r.update(trust_model="central", secure_aggregation=secagg, run_claimed_epsilon=run_claim, run_rounds=per_client,
             run_claim_plan=whole,
             audited=scope, plan=plan.as_dict(), mechanism="dp-fedavg-secagg" if secagg else "dp-fedavg",
             seconds=round(time.perf_counter() - began, 1))
    r["verdict"] = verdict(r)
    log(_line("  user level", r))
    return r


def _secure_user_audit(cfg, rounds: int, content, n_items: int, population: int, *, cap: int, margin: float,
                       noise_fraction: float, generator: torch.Generator, log) -> dict[str, Any]:
    """Trust model `secure`: canary clients through the devices' discrete Gaussian shares and the server's
    modular sum and decode (`audit_secure_rounds`), every client every round, on the longest prefix of rounds
    whose DDG claim the planned canaries could certify."""
    from server.secure_sum import SecureRound
    from shared.model import build_model, shared_state
    from shared.privacy.distributed_dp import ddg_epsilon

    delta = cfg.user_delta
    reference = shared_state(build_model(content, n_items, cfg))
    fraction = cfg.fraction_train
    per_client = rounds
    if cfg.max_rounds_per_client and fraction >= 1.0:
        per_client = min(rounds, cfg.max_rounds_per_client)
    rate = fraction if fraction < 1.0 else 1.0
    # what the run charged each round: the plan for the expected devices, at its fewest decodable shares
    run_round = SecureRound.plan_round(cfg, rate * population, reference)
    run_claim = ddg_epsilon([(run_round.plan, run_round.min_survivors, rate)] * per_client, delta)
    log(f"user level (secure, distributed discrete Gaussian): the run claims at most epsilon {run_claim:.3f} at delta "
        f"{delta:g} for a client in {per_client} rounds (noise multiplier {cfg.user_noise_multiplier:g}, the fewest "
        f"shares a round decodes, {run_round.min_survivors} of {run_round.expected}; its ledger charges the shares "
        f"actually summed, so what it printed can be lower; fraction {fraction:g}, {population} clients)")
    whole = _whole_run(run_claim, delta, inclusion_probability(rate, per_client), log)
    # planned with the population's plan; the audit's own claim is recomputed for its devices (population
    # plus canary slots), every one of them in every round (no amplification)
    audit_plan = SecureRound.plan_round(cfg, population, reference).plan
    claim_rounds = lambda r: ddg_epsilon([(audit_plan, population, 1.0)] * r, delta)  # noqa: E731
    r_audit, plan = _prefix_plan(claim_rounds, lambda r: 1.0, per_client, delta, min(cap, _dimension(reference)),
                                 margin)
    scope = f"the first {r_audit} of {per_client} rounds, every client in every round"
    log(f"  audited on {scope}: {plan.message}")
    began = time.perf_counter()
    r = audit_secure_rounds(reference, plan.canaries, rounds=r_audit, cfg=cfg, population=population, delta=delta,
                            noise_fraction=noise_fraction, generator=generator, design=plan.design)
    r.update(trust_model="secure", secure_aggregation=cfg.secure_aggregation, run_claimed_epsilon=run_claim,
             run_rounds=per_client, run_claim_plan=whole, audited=scope, plan=plan.as_dict(),
             mechanism="ddg-secure-sum", seconds=round(time.perf_counter() - began, 1))
    r["verdict"] = verdict(r)
    log(_line("  user level", r))
    return r


def _dimension(reference: dict[str, torch.Tensor]) -> int:
    return sum(int(v.numel()) for v in reference.values())


def audit_run(run_dir: str | Path, *, max_canaries: int = RUN_CANARY_CAP, margin: float = MARGIN,
              size_runs: int | None = None, noise_fraction: float = 1.0, random_content: bool = False,
              level: str = "both", seed: int | None = None, leaky_divisor: bool = False, log=print) -> dict[str, Any]:
    """Audit the mechanisms of the run in `run_dir` with its own configuration (model, sampling, noise, clip,
    rounds, population), each on the longest prefix whose claim one run can test; writes
    `run_dir/empirical-audit.json`. `noise_fraction` < 1 deliberately breaks the audited mechanisms;
    `leaky_divisor` puts the n-leak (Opacus's divisor int(n q)) into the size audit's DP-SGD (`LeakyDivisor`)."""
    run_dir = Path(run_dir)
    cfg, rounds, source = load_run_config(run_dir)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(secrets.randbits(62) if seed is None else seed)
    started = time.perf_counter()
    log(f"avrec audit empirical {run_dir}: configuration from {source}, dp = {cfg.dp}, {rounds} rounds run")
    content, n_items, trains, note = _run_population(cfg, random_content, generator, log)
    out: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "config_source": source, "dp": cfg.dp,
                           "content": note, "max_canaries": max_canaries, "margin": margin,
                           "noise_fraction_run": noise_fraction, "leaky_divisor_fault_injected": leaky_divisor}
    if noise_fraction != 1.0:
        log(f"FAULT INJECTION: the audited mechanisms run with {noise_fraction:g} of the claimed noise")
    if leaky_divisor:
        log("FAULT INJECTION: the size audit's DP-SGD divides by int(n q), q = 1 / ceil(n / batch-size) (the n-leak)")
    if cfg.record_dp and level in ("record", "both"):
        out["record"] = _record_audits(cfg, rounds, content, n_items, trains, cap=max_canaries, margin=margin,
                                       size_runs=size_runs, noise_fraction=noise_fraction, leaky_divisor=leaky_divisor,
                                       generator=generator, log=log)
    if cfg.user_dp and level in ("user", "both"):
        out["user"] = _user_audit(cfg, rounds, content, n_items, len(trains), cap=max_canaries, margin=margin,
                                  noise_fraction=noise_fraction, generator=generator, log=log)
    if not (cfg.record_dp or cfg.user_dp):
        log("the run ran without differential privacy (dp = none): no claim to audit")
    out["seconds"] = round(time.perf_counter() - started, 1)
    (run_dir / OUTPUT).write_text(json.dumps(out, indent=2, default=float))
    log(f"wrote {run_dir / OUTPUT} ({out['seconds']} s)")
    return out
