"""`avrec audit empirical`: the one-run privacy audit of Steinke, Nasr and Jagielski (NeurIPS 2023).

m canaries are each included independently with probability 1/2; after one training run each gets a
score; the auditor guesses "in" for the highest scores and "out" for the lowest and abstains on the rest.
If the training is (eps, delta)-DP, r guesses contain v or more correct ones with probability at most
p(eps) = P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha (their Theorem 3.1 with delta; alpha
as in their Algorithm). The lower bound is the largest eps with p(eps) <= 0.05: a claimed epsilon below it
is refuted at 95% confidence. An audit can falsify a claim, never prove it.

Two audits, each on avrec's real code path:
- record level (white-box gradient canaries): a real Opacus DP-SGD run of avrec's two-tower model through
  `client.trainer.train_local`; each present canary is Poisson-sampled into each step like an example and
  contributes the per-sample gradient C * u_i (u_i a random unit direction over all trainable parameters),
  appended to Opacus's per-sample gradients before clipping and noise; score = -<theta_T - theta_0, u_i>.
- user level (canary clients, Andrew et al. ICLR 2024): present canary clients send the update C * u_i every
  round through `server.aggregate.aggregate`, DP-FedAvg's clip check, noise and fixed denominator; score =
  <sum of the aggregated deltas, u_i>. The other clients' updates are random vectors of norm up to C: the
  audit concerns the mechanism, which treats every update alike.

`noise_fraction` breaks the training on purpose (the mechanism runs with that fraction of the noise the
ledger claims) to show that the audit catches it.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from .accounting import SampledGaussian, epsilon_checked

CONFIDENCE = 0.05
GUESS_COUNTS = (20, 50, 100, 200, 500, 1000)  # fixed in advance; Bonferroni over them


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


def audit_scores(scores: np.ndarray, present: np.ndarray, delta: float,
                 guess_counts: Sequence[int] = GUESS_COUNTS) -> dict[str, Any]:
    """Guess "in" for the k/2 highest and "out" for the k/2 lowest scores, for each k fixed in advance, and
    keep the best bound, each at confidence 0.05 / len(guess_counts) (Bonferroni over the k tried)."""
    m = len(scores)
    order = np.argsort(-scores)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    counts = [k for k in guess_counts if k <= m]
    for k in counts:
        top, bottom = order[: k // 2], order[m - (k - k // 2):]
        correct = int(present[top].sum() + (~present[bottom]).sum())
        bound = epsilon_lower_bound(m, k, correct, delta, CONFIDENCE / len(counts))
        if bound > best["epsilon_lower_bound"] or not best["guesses"]:
            best = {"epsilon_lower_bound": bound, "guesses": k, "correct": correct}
    return {"canaries": m, "confidence": 1 - CONFIDENCE, "guess_counts": counts, **best}


@dataclass
class GradientCanaries:
    """Called by `train_local` between backward and step: appends the sampled canaries' per-sample gradients
    to Opacus's, so they are clipped, summed and noised with the real examples."""

    directions: torch.Tensor  # (m, D) unit rows
    present: np.ndarray  # (m,) bool
    sample_rate: float
    clip_norm: float
    noise_fraction: float = 1.0
    claimed_sigma: float | None = None

    def __call__(self, optimizer) -> None:
        if self.claimed_sigma is None:
            self.claimed_sigma = optimizer.noise_multiplier
            optimizer.noise_multiplier = self.claimed_sigma * self.noise_fraction  # the deliberate bug, if any
        draw = np.array([secrets.SystemRandom().random() < self.sample_rate for _ in range(len(self.present))])
        rows = self.directions[torch.as_tensor(self.present & draw)] * self.clip_norm
        offset = 0
        for p in optimizer.params:
            n = p.numel()
            extra = rows[:, offset: offset + n].reshape(-1, *p.shape).to(p.grad_sample.dtype)
            p.grad_sample = torch.cat([p.grad_sample, extra])
            offset += n


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _random_units(m: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """m random unit directions, orthonormal where dim >= m (no canary then leaks into another's score)."""
    u = torch.randn(m, dim, generator=generator)
    if dim >= m:
        return torch.linalg.qr(u.T.double())[0].T.float().contiguous()
    return u / u.norm(dim=1, keepdim=True)


def _content(n_items: int, dim: int, generator: torch.Generator):
    from shared.features import ItemContent

    feats = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=generator), dim=-1)
    return ItemContent({"text": feats}, torch.ones(n_items, 1), 0, 0.0)


def record_level(canaries: int = 1000, noise_fraction: float = 1.0, seed: int = 0, examples: int = 200,
                 noise_multiplier: float = 2.0, steps: int = 104, sample_rate: float = 1 / 13, delta: float = 1e-5,
                 embedding_dim: int = 64) -> dict[str, Any]:
    """White-box gradient canaries in one device's DP-SGD (avrec's model, Opacus, `train_local`)."""
    from client.trainer import train_local
    from shared.config import RunConfig
    from shared.model import build_model

    g = torch.Generator().manual_seed(seed)
    cfg = RunConfig(dp="record", noise_multiplier=noise_multiplier, record_steps=steps, record_sample_rate=sample_rate,
                    embedding_dim=embedding_dim)
    content = _content(300, 32, g)
    torch.manual_seed(seed)
    model = build_model(content, 300, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    before = _flat(params).clone()
    items = torch.randint(0, 300, (examples,), generator=g).numpy()
    history = torch.nn.functional.normalize(torch.randn(1, 32, generator=g), dim=-1)
    rate = cfg.record_sample_rate
    injector = GradientCanaries(_random_units(canaries, before.numel(), g),
                                np.array([secrets.randbits(1) == 1 for _ in range(canaries)]), rate, cfg.clip_norm,
                                noise_fraction)
    result = train_local(model, items, history, cfg, secrets.randbits(62), dp=True, after_backward=injector)
    after = _flat([p for p in model.parameters() if p.requires_grad])
    scores = -(injector.directions @ (after - before)).numpy()
    claimed = epsilon_checked([SampledGaussian(noise_multiplier, rate, result.steps)], delta).epsilon
    return {"level": "record", "claimed_epsilon": claimed, "delta": delta, "noise_multiplier_claimed": noise_multiplier,
            "noise_fraction_run": noise_fraction, "sample_rate": rate, "steps": result.steps,
            "parameters": int(before.numel()), **audit_scores(scores, injector.present, delta)}


def user_level(canaries: int = 1000, noise_fraction: float = 1.0, seed: int = 0, rounds: int = 2,
               noise_multiplier: float = 2.0, other_clients: int = 50, delta: float = 1e-5) -> dict[str, Any]:
    """Canary clients with random update directions through DP-FedAvg (`server.aggregate.aggregate`)."""
    from server.aggregate import aggregate
    from shared.config import RunConfig
    from shared.model import build_model, shared_state

    g = torch.Generator().manual_seed(seed)
    cfg = RunConfig(dp="user", embedding_dim=16)
    reference = shared_state(build_model(_content(300, 32, g), 300, cfg))
    names = list(reference)
    sizes = [reference[k].numel() for k in names]
    dim = sum(sizes)

    def unflat(vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: part.reshape(reference[k].shape) for k, part in zip(names, torch.split(vec, sizes))}

    directions = _random_units(canaries, dim, g)
    present = np.array([secrets.randbits(1) == 1 for _ in range(canaries)])
    clip = cfg.user_clip_norm
    # Every client every round (no amplification), and the fixed denominator: the expected population.
    denominator = other_clients + canaries / 2
    total = torch.zeros(dim, dtype=torch.float64)
    for _ in range(rounds):
        others = torch.randn(other_clients, dim, generator=g)
        others = others / others.norm(dim=1, keepdim=True) * clip * torch.rand(other_clients, 1, generator=g)
        updates = [(f"client {i}", unflat(u)) for i, u in enumerate(others)]
        updates += [(f"canary {i}", unflat(directions[i] * clip * (1 - 1e-6))) for i in np.flatnonzero(present)]
        result = aggregate(updates, reference, user_dp=True, clip_norm=clip,
                           noise_multiplier=noise_multiplier * noise_fraction, expected_clients=denominator)
        if result.rejected:
            raise RuntimeError(f"the aggregator rejected audit updates: {result.rejected[:3]}")
        total += torch.cat([result.delta[k].double().reshape(-1) for k in names])
    scores = (directions.double() @ total).numpy()
    claimed = epsilon_checked([SampledGaussian(noise_multiplier, 1.0, rounds)], delta).epsilon
    return {"level": "user", "claimed_epsilon": claimed, "delta": delta, "noise_multiplier_claimed": noise_multiplier,
            "noise_fraction_run": noise_fraction, "rounds": rounds, "parameters": dim,
            **audit_scores(scores, present, delta)}


def verdict(result: dict[str, Any]) -> str:
    lb, claim = result["epsilon_lower_bound"], result["claimed_epsilon"]
    return ("CLAIM REFUTED: the lower bound exceeds the claimed epsilon" if lb > claim
            else "consistent with the claim (an audit can refute a claim, never prove it)")


def run_empirical(level: str = "both", canaries: int = 1000, noise_fraction: float = 1.0, seed: int = 0,
                  log=print) -> dict[str, Any]:
    out: dict[str, Any] = {}
    torch.set_num_threads(1)
    for name, audit in (("record", record_level), ("user", user_level)):
        if level in (name, "both"):
            r = audit(canaries=canaries, noise_fraction=noise_fraction, seed=seed)
            r["verdict"] = verdict(r)
            out[name] = r
            log(f"{name} level: claimed epsilon {r['claimed_epsilon']:.3f} at delta {r['delta']:g}; "
                f"empirical lower bound {r['epsilon_lower_bound']:.3f} (95%, {r['correct']}/{r['guesses']} guesses "
                f"correct, {r['canaries']} canaries; noise run at {noise_fraction:g} of the claim): {r['verdict']}")
    return out
