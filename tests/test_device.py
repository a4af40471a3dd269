"""One device without Flower: what it sends, what it keeps, and how it enforces its budget."""

import pytest
import torch

from client.device import Device
from shared.config import RunConfig
from shared.data.dataset import load_dataset
from shared.data.split import leave_one_out
from shared.data.synthetic import write_planted_dataset
from shared.features import item_content
from shared.model import build_model, shared_state


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    dataset = load_dataset(write_planted_dataset(root / "data", n_users=4, n_items=90, seed=1))
    split = leave_one_out(dataset, 0, n_negatives=49)
    content = item_content(dataset, ["text"], root / "cache")
    return root, dataset, split, content


def make(world, name, **changes):
    root, dataset, split, content = world
    cfg = RunConfig(**{"eval_negatives": 49, "dp": "record", **changes})
    user = split.users[0]
    device = Device(dataset.user_ids[user.user], user, content, dataset.n_items, cfg, root / name)
    torch.manual_seed(0)
    return device, shared_state(build_model(content, dataset.n_items, cfg))


def test_only_shared_weights_leave_and_private_state_persists(world):
    device, global_state = make(world, "a")
    reply = device.train_round(global_state, 1)
    assert set(reply.delta) == set(global_state) and not any("user_vector" in k for k in reply.delta)
    assert any(float(v.abs().sum()) > 0 for v in reply.delta.values())
    saved = device.state.load_private()
    assert "users.user_vector.weight" in saved and "history" in saved
    # Under DP the evaluation and the loss depend on the user's records: the harness may read them, the
    # device sends only whether it declined.
    assert reply.metrics == {"declined": 0.0}
    assert set(reply.evaluation) >= {"sampled-99/test/hr@10", "full/test/recall@20", "train-loss"}


def test_without_dp_the_device_reports_its_evaluation(world):
    device, global_state = make(world, "f", dp="none")
    reply = device.train_round(global_state, 1)
    assert set(reply.metrics) >= {"sampled-99/test/hr@10", "full/test/recall@20", "train-loss", "declined"}


def test_ledger_continues_across_runs_and_history_is_charged_once(world):
    device, global_state = make(world, "b")
    device.train_round(global_state, 1)
    again, _ = make(world, "b")  # a new run on the same device directory
    again.train_round(global_state, 2)
    mechanisms = [e.mechanism for e in again.state.ledger.entries]
    assert mechanisms == ["gaussian-history-release", "dp-sgd", "dp-sgd"]
    assert [e.round for e in again.state.ledger.entries] == [1, 1, 2]


def test_a_later_run_starts_at_round_1_on_a_device_whose_ledger_holds_earlier_rounds(world):
    # Device state persists across runs by design: a new run (a new run id) counts its rounds afresh, while the
    # ledger, and so the budget, spans both. With history-refresh-rounds > 0 a new run starts with a release.
    device, global_state = make(world, "g", history_refresh_rounds=3)
    for r in (1, 2):
        device.train_round(global_state, r, run_id="first")
    later, _ = make(world, "g", history_refresh_rounds=3)
    reply = later.train_round(global_state, 1, run_id="second")
    assert reply.delta is not None
    entries = later.state.ledger.entries
    assert [(e.round, e.details["run"], e.mechanism) for e in entries] == [
        (1, "first", "gaussian-history-release"), (1, "first", "dp-sgd"), (2, "first", "dp-sgd"),
        (1, "second", "gaussian-history-release"), (1, "second", "dp-sgd")]


def test_a_device_declines_a_round_over_its_budget_and_records_nothing(world):
    device, global_state = make(world, "c", epsilon_budget=0.5)
    reply = device.train_round(global_state, 1)
    assert reply.delta is None and "over the budget 0.5" in reply.declined
    assert device.state.ledger.entries == []


def test_user_level_dp_clips_the_update_on_the_device(world):
    from shared.updates import update_norm

    device, global_state = make(world, "d", dp="user", user_clip_norm=0.01)
    reply = device.train_round(global_state, 1)
    assert update_norm(reply.delta) <= 0.01 * (1 + 1e-5)
    assert device.state.ledger.entries == []  # no record-level mechanism ran


def test_a_declining_device_still_evaluates_for_the_harness_once_its_history_is_released(world):
    device, global_state = make(world, "e")
    device.train_round(global_state, 1)
    spent = device.state.ledger.epsilon(1e-5).epsilon
    tight, _ = make(world, "e", epsilon_budget=spent + 0.01)
    reply = tight.train_round(global_state, 2)
    assert reply.delta is None and reply.metrics == {"declined": 1.0}
    assert "sampled-99/test/hr@10" in reply.evaluation
    assert len(tight.state.ledger.entries) == 2  # nothing charged for the declined round
