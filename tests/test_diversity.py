"""Diversity metrics and MMR re-ranking on hand-made content where the answers are known."""

import numpy as np
import pytest
import torch

from shared.diversity import coverage, intra_list_distance, novelty, self_information
from shared.serving.rerank import mmr

# Items 0 and 1 are near-duplicates; 2 points elsewhere; 3 is orthogonal to all.
CONTENT = torch.nn.functional.normalize(torch.tensor(
    [[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)


def test_diversity_metrics():
    assert intra_list_distance([0, 0], CONTENT) == pytest.approx(0.0, abs=1e-6)
    assert intra_list_distance([0, 3], CONTENT) == pytest.approx(1.0)
    assert intra_list_distance([2, 3, 0], CONTENT) == pytest.approx(1.0)
    info = self_information(np.array([8, 4, 0, 1]), 8)
    assert info.tolist() == [0.0, 1.0, 3.0, 3.0]  # an item no one saw counts as one interaction
    assert novelty([0, 1], info) == 0.5
    assert coverage([[0, 1], [1, 2]], 4) == 0.75


def test_mmr_trades_relevance_for_spread_with_one_knob():
    scores = torch.tensor([3.0, 2.9, 1.0, 0.5])
    assert mmr(scores, CONTENT, 2, 0.0) == [0, 1]  # the model's order
    assert mmr(scores, CONTENT, 2, 0.5) == [0, 2]  # the near-duplicate gives way
    assert mmr(scores, CONTENT, 3, 1.0) == [0, 2, 3]  # spread alone after the first
    excluded = scores.clone()
    excluded[0] = -torch.inf
    assert mmr(excluded, CONTENT, 10, 0.5)[0] == 1 and len(mmr(excluded, CONTENT, 10, 0.5)) == 3
    with pytest.raises(ValueError, match="diversity = 1.5"):
        mmr(scores, CONTENT, 2, 1.5)
