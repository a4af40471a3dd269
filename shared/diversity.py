"""Diversity of recommendation lists, beside accuracy.

- intra-list distance (ILD): mean pairwise cosine distance (1 - cosine) between a list's items in content
  space (the items' content rows), per list;
- novelty: mean self-information -log2(p_i) of a list's items, p_i the share of users who interacted with
  item i in training (unseen items count as one interaction, so the value stays finite), per list;
- catalogue coverage: the share of the catalogue that appears in at least one list (one value per system).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F


def intra_list_distance(items: Sequence[int], content: torch.Tensor) -> float:
    if len(items) < 2:
        return 0.0
    rows = F.normalize(content[torch.as_tensor(list(items))], dim=-1)
    sims = rows @ rows.T
    n = len(items)
    return float((n * n - sims.sum()) / (n * (n - 1)))  # the diagonal contributes 1 - 1 = 0


def self_information(train_counts: np.ndarray, n_users: int) -> np.ndarray:
    """-log2 of each item's training popularity (share of users)."""
    return -np.log2(np.maximum(train_counts, 1) / max(n_users, 1))


def novelty(items: Sequence[int], information: np.ndarray) -> float:
    return float(np.mean(information[list(items)])) if len(items) else 0.0


def coverage(lists: Sequence[Sequence[int]], n_items: int) -> float:
    return len({i for items in lists for i in items}) / n_items
