"""The towers: shared vs private parameters, cold-start items, and the recent-items contexts."""

import numpy as np
import torch
from torch.nn import functional as F

from shared.config import RunConfig
from shared.features import ItemContent
from shared.model import build_model, private_state, recent_contexts, shared_state


def content(n=20, d=8):
    torch.manual_seed(0)
    return ItemContent({"text": F.normalize(torch.randn(n, d), dim=-1)}, torch.ones(n, 1), 0, 0.0)


def test_recent_contexts_by_hand():
    ctx = recent_contexts(np.array([7, 8, 9]), 2).tolist()
    assert ctx == [[-1, -1], [-1, 7], [7, 8], [8, 9]]


def test_private_vector_is_never_in_the_shared_state():
    model = build_model(content(), 20, RunConfig())
    assert set(private_state(model)) == {"users.user_vector.weight"}
    assert not set(private_state(model)) & set(shared_state(model))


def test_items_outside_the_catalogue_are_ranked_from_content_alone():
    model = build_model(content(), 15, RunConfig(dp="none"))  # items 15..19 are new: no ID embedding
    new = torch.arange(15, 20)
    with_ids = model.items(new)
    without = model.items(new, torch.zeros(5, dtype=torch.bool))
    assert torch.allclose(with_ids, without)
    old = torch.arange(0, 5)
    assert not torch.allclose(model.items(old), model.items(old, torch.zeros(5, dtype=torch.bool)))
    scores = model.score_all(torch.randn(1, 8))
    assert scores.shape == (1, 20) and torch.isfinite(scores).all()
