"""Diversity-aware re-ranking: maximal marginal relevance (Carbonell and Goldstein, SIGIR 1998), one knob.

From the `POOL` x k best-scored candidates, items are picked one at a time by
`(1 - diversity) * relevance - diversity * (largest cosine similarity to an item already picked)`, with
relevance the model's score rescaled to [0, 1] over the pool and similarity measured in content space
(the items' content rows, unit length). `diversity = 0` keeps the model's order; 1 picks for spread alone.
"""

from __future__ import annotations

import torch

POOL = 10  # candidates considered per list slot


def mmr(scores: torch.Tensor, content: torch.Tensor, k: int, diversity: float) -> list[int]:
    """Indices of `k` items re-ranked from `scores` (n,) (-inf = excluded); `content` (n, D) unit rows."""
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity = {diversity}: expected a value in [0, 1] (0 = the model's order)")
    available = int(torch.isfinite(scores).sum())
    k = min(k, available)
    pool = torch.topk(scores, min(available, POOL * k)).indices
    if diversity == 0.0 or k == 0:
        return pool[:k].tolist()
    rel = scores[pool]
    rel = (rel - rel.min()) / (rel.max() - rel.min()).clamp(min=1e-12)
    sims = content[pool] @ content[pool].T
    picked = [0]  # the most relevant item is always first
    closest = sims[0].clone()
    chosen = torch.zeros(len(pool), dtype=torch.bool)
    chosen[0] = True
    for _ in range(k - 1):
        gain = ((1 - diversity) * rel - diversity * closest).masked_fill(chosen, -torch.inf)
        j = int(gain.argmax())
        picked.append(j)
        chosen[j] = True
        closest = torch.maximum(closest, sims[j])
    return pool[picked].tolist()
