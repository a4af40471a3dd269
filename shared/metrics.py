"""Ranking metrics and the two evaluation protocols, computed from one score vector per user.

Protocols (both use the leave-one-out split of `shared.data.split`):
- `sampled-99`: the held-out item is ranked against the user's sampled negatives (HR@10, NDCG@10), the
  protocol of published federated recommenders;
- `full`: the held-out item is ranked against every item, with the items the user is known to have
  (training items, and for test also the validation item) masked (HR@10, NDCG@10, Recall@20).
Ties are counted against the held-out item, so a constant scorer earns nothing.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

PROTOCOLS = ("sampled-99", "full")
METRICS = {"sampled-99": ("hr@10", "ndcg@10"), "full": ("hr@10", "ndcg@10", "recall@20")}


def rank_of(target_score: float, other_scores: np.ndarray) -> int:
    """0-based rank of the target among others: how many score higher or tie with it."""
    return int(np.count_nonzero(other_scores >= target_score))


def hit(rank: int, k: int) -> float:
    return 1.0 if rank < k else 0.0


def ndcg(rank: int, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) inside the top k."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0


def protocol_metrics(protocol: str, rank: int) -> dict[str, float]:
    out = {"hr@10": hit(rank, 10), "ndcg@10": ndcg(rank, 10)}
    if protocol == "full":
        out["recall@20"] = hit(rank, 20)  # one held-out item: recall@20 equals HR@20
    return out


def user_metrics(
    scores: np.ndarray,
    train: np.ndarray,
    val: int,
    test: int,
    val_negatives: np.ndarray,
    test_negatives: np.ndarray,
    test_scores: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric of both protocols for one user, keyed `protocol/stage/metric`. `scores` rank the
    validation item and, unless `test_scores` are given (a model that reads the validation item as history
    by test time), the test item too."""
    out: dict[str, float] = {}
    for stage, target, negatives, other_known, stage_scores in (
        ("val", val, val_negatives, test, scores),
        ("test", test, test_negatives, val, scores if test_scores is None else test_scores),
    ):
        ranked = np.asarray(stage_scores, dtype=np.float64)
        rank = rank_of(ranked[target], ranked[negatives])
        for name, value in protocol_metrics("sampled-99", rank).items():
            out[f"sampled-99/{stage}/{name}"] = value
        masked = ranked.copy()
        masked[train] = -np.inf
        masked[target] = -np.inf
        if stage == "test":
            masked[other_known] = -np.inf  # the validation item is known by test time
        rank = rank_of(ranked[target], masked)
        for name, value in protocol_metrics("full", rank).items():
            out[f"full/{stage}/{name}"] = value
    return out


def mean_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    rows = list(rows)
    if not rows:
        return {}
    # fsum is exact, so the mean does not depend on the order the rows (replies) arrived in
    return {k: math.fsum(r[k] for r in rows) / len(rows) for k in rows[0]}


def table(metrics: Mapping[str, float], stage: str = "test") -> dict[str, dict[str, float]]:
    """`{protocol: {metric: value}}` for one stage, from `protocol/stage/metric` keys."""
    return {
        p: {m: metrics[f"{p}/{stage}/{m}"] for m in METRICS[p] if f"{p}/{stage}/{m}" in metrics}
        for p in PROTOCOLS
    }


def mean_and_spread(values) -> str:
    """A table cell for one metric over seeds: the mean, and +- the standard deviation when there are several."""
    return f"{np.mean(values):.4f}" + (f" ± {np.std(values):.4f}" if len(values) > 1 else "")
