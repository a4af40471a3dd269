"""The private vector fitted on the device (client/private_fit.py): it fits, it repeats, and under
record-level DP it never becomes the starting point of what the device trains and sends."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import client.device
from client.device import Device
from client.private_fit import fit_private
from client.serving import DeviceRecommender
from shared.config import ConfigError, RunConfig, load_config
from shared.model import PRIVATE_KEY, build_model, recent_contexts, shared_state


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from shared.data.dataset import load_dataset
    from shared.data.split import leave_one_out
    from shared.data.synthetic import write_planted_dataset
    from shared.features import item_content

    root = tmp_path_factory.mktemp("fit")
    dataset = load_dataset(write_planted_dataset(root / "data", n_users=3, n_items=90, interactions_per_user=30, seed=3))
    split = leave_one_out(dataset, 0, n_negatives=49)
    return root, dataset, split, item_content(dataset, ["text"], root / "cache")


def training_loss(model, items: np.ndarray, vector: torch.Tensor, k: int) -> float:
    """The softmax loss of each training item against the whole catalogue, through the model's own forward."""
    with torch.no_grad():
        model.users.user_vector.weight.copy_(vector)
        targets = torch.as_tensor(items)
        history = model.history_rows[targets].sum(0, keepdim=True).expand(len(items), -1)
        everything = torch.arange(model.items.n_items).expand(len(items), -1)
        logits = model(history, everything, recent=recent_contexts(items, k)[:-1], leave_out=targets)
        return float(F.cross_entropy(logits, targets))


def test_the_fit_lowers_the_users_loss_repeats_and_touches_nothing_else(world):
    _, dataset, split, content = world
    cfg = RunConfig(modalities="text")
    torch.manual_seed(0)
    model = build_model(content, dataset.n_items, cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    user = split.users[0]
    history = model.history_rows[torch.as_tensor(user.train)].sum(0)
    start = 0.1 * torch.randn(1, cfg.embedding_dim)
    fitted = fit_private(model, user.train, history, start, 10, cfg.recent_items)
    assert torch.equal(fit_private(model, user.train, history, start, 10, cfg.recent_items), fitted)
    assert torch.equal(fit_private(model, user.train, history, start, 0, cfg.recent_items), start)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    loss_start = training_loss(model, user.train, start, cfg.recent_items)
    loss_fitted = training_loss(model, user.train, fitted, cfg.recent_items)
    assert loss_fitted < loss_start - 0.1, (loss_start, loss_fitted)
    # Weight-0 examples add nothing to the loss: with every weight 0 the vector stays where it started.
    zeros = np.zeros(len(user.train))
    assert torch.equal(fit_private(model, user.train, history, start, 10, cfg.recent_items, zeros), start)


@pytest.mark.parametrize("dp", ["record", "user"])
def test_training_starts_from_the_fitted_vector_only_where_the_unit_covers_it(world, tmp_path, monkeypatch, dp):
    """Under record-level DP a vector fitted to all of a user's records would make each example's gradient
    depend on every other record, beyond DP-SGD's per-example clip: it may rank, never start training."""
    _, dataset, split, content = world
    cfg = RunConfig(eval_negatives=49, dp=dp, modalities="text", private_fit_steps=6, trust_model="central")
    user = split.users[1]
    device = Device(dataset.user_ids[user.user], user, content, dataset.n_items, cfg, tmp_path / "d")
    torch.manual_seed(0)
    global_state = shared_state(build_model(content, dataset.n_items, cfg))
    seen = {}
    train_local = client.device.train_local

    def spy(model, *args, **kwargs):
        seen["start"] = model.users.user_vector.weight.detach().clone()
        result = train_local(model, *args, **kwargs)
        seen["end"] = model.users.user_vector.weight.detach().clone()
        return result

    monkeypatch.setattr(client.device, "train_local", spy)
    for server_round in (1, 2):
        held = device.state.load_private()
        model = build_model(content, dataset.n_items, cfg)
        model.load_state_dict({**device.private_start(model, held), **global_state})
        history = held["history"] if "history" in held else model.history_rows[torch.as_tensor(user.train)].sum(0)
        fitted = device.fit_private(model, history)
        reply = device.train_round(global_state, server_round)
        assert reply.delta is not None
        assert torch.equal(device.state.load_private()[PRIVATE_KEY], seen["end"])  # the trained vector is kept
        if dp == "record":
            assert torch.equal(seen["start"], model.users.user_vector.weight.detach())  # not the fitted one
            assert not torch.equal(seen["start"], fitted)
        else:
            torch.testing.assert_close(seen["start"], fitted)


def test_serving_fits_a_new_users_vector_to_the_served_weights(world, tmp_path):
    root, dataset, split, content = world
    cfg = RunConfig(modalities="text", private_fit_steps=8, cache_dir=str(root / "cache"))
    torch.manual_seed(0)
    weights = shared_state(build_model(content, dataset.n_items, cfg))
    served = DeviceRecommender(dataset, cfg, weights, tmp_path / "no-state")
    user = served.user(dataset.user_ids[0])  # no saved state: a new device
    assert user.private is not None and user.private.norm() > 0
    plain = DeviceRecommender(dataset, cfg.replace(private_fit_steps=0), weights, tmp_path / "no-state")
    assert plain.user(dataset.user_ids[0]).private is None
    model = served.recommender.model
    zero = torch.zeros(1, cfg.embedding_dim)
    assert training_loss(model, user.history, user.private[None], cfg.recent_items) < training_loss(
        model, user.history, zero, cfg.recent_items)


def test_bad_fit_settings_are_refused_and_no_vector_means_no_fit():
    with pytest.raises(ConfigError, match="private-fit-steps = -1"):
        load_config(None, {"private-fit-steps": "-1"})
    assert not load_config(None, {"private-fit-steps": "5", "private-user-vector": "false"}).fits_private
