"""The towers: shared vs private parameters, cold-start items, and the recent-items contexts."""

import numpy as np
import torch
from torch.nn import functional as F

from shared.config import RunConfig
from shared.features import ItemContent
from shared.model import build_model, evaluation_inputs, private_state, recent_contexts, shared_state


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


def test_evaluation_inputs_add_the_validation_item_before_the_test_item():
    rows = torch.eye(6)
    train = np.array([0, 3, 4])
    history = rows[train].sum(0)
    histories, recent = evaluation_inputs(history, rows, train, 5, 2)
    assert histories[0].tolist() == [1, 0, 0, 1, 1, 0]  # ranks the validation item: training history
    assert histories[1].tolist() == [1, 0, 0, 1, 1, 1]  # ranks the test item: the validation item joined
    assert recent.tolist() == [[3, 4], [4, 5]]
    assert evaluation_inputs(history, rows, train, 5, 0)[1] is None


def test_a_training_example_leaves_its_own_target_out_of_the_history():
    model = build_model(content(), 20, RunConfig(dp="none"))
    history = model.history_rows[[1, 2, 3]].sum(0, keepdim=True)
    without = model.user_vectors(history, leave_out=torch.tensor([3]))
    assert torch.allclose(without, model.user_vectors(model.history_rows[[1, 2]].sum(0, keepdim=True)), atol=1e-6)


def test_recent_items_are_weighted_per_position():
    model = build_model(content(), 20, RunConfig(dp="none", recent_items=2))
    history = model.history_rows[[1, 2]].sum(0, keepdim=True)
    recent = torch.tensor([[1, 2]])
    before = model.user_vectors(history, recent=recent)
    with torch.no_grad():
        model.users.recent_weights.weight.copy_(torch.tensor([[0.0, 1.0]]))
    assert not torch.allclose(before, model.user_vectors(history, recent=recent))
    # with the oldest position weighted 0 only the latest item counts, over the two valid positions
    users = model.users
    expected = users.history(torch.nn.functional.normalize(history, dim=-1)) + model.items(torch.tensor([2])) / 2
    expected = torch.nn.functional.normalize(expected + users.user_vector.weight, dim=-1)
    assert torch.allclose(model.user_vectors(history, recent=recent), expected, atol=1e-6)


def test_under_record_dp_the_recent_items_serve_with_fixed_weights():
    model = build_model(content(), 20, RunConfig(dp="record", recent_items=2))
    assert not model.users.recent_weights.weight.requires_grad
    assert torch.equal(model.users.recent_weights.weight, torch.ones(1, 2))
    history = model.history_rows[[1, 2]].sum(0, keepdim=True)
    assert not torch.allclose(model.user_vectors(history), model.user_vectors(history, recent=torch.tensor([[1, 2]])))
