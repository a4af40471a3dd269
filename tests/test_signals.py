"""Behaviour signals: the dataset's event columns, their mapping to example weights and dislikes, the DP bound
(under DP-SGD a weight <= 1 scales each clipped per-example gradient: Opacus's own clip and sum), dislikes refused where they
would couple records, and nothing new leaving the device."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from client.device import Device
from client.trainer import WeightedCrossEntropy, example_draws, example_logits, weigh_clipped
from shared.config import ConfigError, RunConfig
from shared.data.dataset import DatasetError, load_dataset
from shared.data.signals import run_split
from shared.data.synthetic import write_planted_dataset
from shared.features import item_content
from shared.model import build_model, shared_state

EVENTS = ["like", "play", "skip", "dislike", ""]  # cycled over each user's interactions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    data = write_planted_dataset(root / "data", n_users=4, n_items=60, interactions_per_user=20, seed=2)
    frame = pd.read_csv(data / "interactions.csv", dtype=str)
    frame["event"] = [EVENTS[i % len(EVENTS)] for i in range(len(frame))]
    frame["watch_fraction"] = ["0.5" if i % 7 == 1 else "" for i in range(len(frame))]
    frame["rating"] = [str(1 + i % 5) for i in range(len(frame))]
    frame.to_csv(data / "interactions.csv", index=False)
    dataset = load_dataset(data)
    return root, data, dataset, item_content(dataset, ["text"], root / "cache")


def write_bad(tmp_path, data, column, value):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "items.csv").write_text((data / "items.csv").read_text())
    frame = pd.read_csv(data / "interactions.csv", dtype=str, keep_default_na=False)
    frame.loc[3, column] = value
    frame.to_csv(bad / "interactions.csv", index=False)
    return bad


@pytest.mark.parametrize("column, value, expected", [("event", "purchase", "expected one of like, play, skip, dislike"),
                                                     ("watch_fraction", "85", "expected a number in [0, 1]")])
def test_bad_event_columns_are_one_line_errors_naming_the_line(world, tmp_path, column, value, expected):
    with pytest.raises(DatasetError, match=r"line 5: " + column) as err:
        load_dataset(write_bad(tmp_path, world[1], column, value))
    assert expected in str(err.value) and "\n" not in str(err.value)


def expected_signal(row, source):
    event = row["event"] or "play" if source == "event" else {5: "like", 4: "like", 3: "play"}.get(int(row["rating"]), "dislike")
    weight = {"like": 1.0, "play": 0.5, "skip": 0.0, "dislike": 0.0}[event]
    if source == "event" and row["watch_fraction"] == row["watch_fraction"]:  # not NaN
        weight *= float(row["watch_fraction"])
    return weight, event == "dislike"


@pytest.mark.parametrize("source", ["event", "rating"])
def test_each_train_item_gets_its_own_interaction_s_weight_and_dislikes_are_never_positive(world, source):
    _, _, dataset, _ = world
    split = run_split(dataset, RunConfig(eval_negatives=20, signals=source))
    frame = dataset.interactions.set_index(["user", "item"])
    for u in split.users:
        assert len(u.weights) == len(u.train)
        for item, weight in zip(u.train, u.weights):
            want, disliked = expected_signal(frame.loc[(u.user, item)], source)
            assert weight == pytest.approx(want) and (item in u.dislikes) == disliked
        assert np.all(u.weights[np.isin(u.train, u.dislikes)] == 0)
    assert sum(len(u.dislikes) for u in split.users) > 0
    plain = run_split(dataset, RunConfig(eval_negatives=20))
    assert all(a.weights is None and np.array_equal(a.train, b.train) and a.test == b.test
               for a, b in zip(plain.users, split.users))  # the split itself (history, held-out items) is the same


def test_settings_that_would_void_the_bound_or_couple_records_are_refused():
    with pytest.raises(ConfigError, match=r"signal-weights .*'like=1.5'.*\[0, 1\]"):
        RunConfig(signal_weights="like=1.5,play=0.5,skip=0")
    with pytest.raises(ConfigError, match="never a positive"):
        RunConfig(signal_weights="like=1,play=0.5,skip=0,dislike=0.1")
    with pytest.raises(ConfigError, match="signals = 'votes'"):
        RunConfig(signals="votes")
    for dp in ("record", "both"):
        with pytest.raises(ConfigError, match=r"dislike-negatives = 2 with dp = '\w+': .*couples two records") as err:
            RunConfig(dp=dp, signals="rating", dislike_negatives=2)
        assert "\n" not in str(err.value)
    RunConfig(dp="user", signals="rating", dislike_negatives=2)  # the user is the unit: allowed
    RunConfig(dp="record", signals="rating")  # weights alone keep the record-level bound


def test_under_dp_sgd_a_weight_scales_the_clipped_gradient_and_opacus_sums_exactly_that(world):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    _, _, dataset, content = world
    cfg = RunConfig(dp="record", eval_negatives=20, modalities="text")
    torch.manual_seed(0)
    module = GradSampleModule(build_model(content, dataset.n_items, cfg))
    targets = torch.arange(6)
    history = torch.randn(1, module._module.history_rows.shape[1])
    weights = torch.tensor([1.0, 0.5, 0.0, 0.25, 1.0, 0.75])

    def per_sample():
        module.zero_grad(set_to_none=True)
        for p in module.parameters():
            p.grad_sample = None
        logits = example_logits(module, history, targets, dataset.n_items, cfg, torch.Generator().manual_seed(3))
        WeightedCrossEntropy()(logits, torch.ones(6)).backward()
        return torch.cat([p.grad_sample.reshape(6, -1) for p in module.parameters() if p.requires_grad], dim=1)

    plain = per_sample()
    norms = plain.norm(dim=1)
    clip = float(norms.median())  # some examples clipped, some not
    assert (norms > clip).any() and (norms < clip).any()
    want = (weights * (clip / norms).clamp(max=1.0)) @ plain  # sum_i w_i clip(g_i)
    # Opacus's own optimizer clips and sums after weigh_clipped, as in train_local
    optimizer = DPOptimizer(torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1),
                            noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=6)
    weigh_clipped(optimizer, weights, clip)
    weighed = torch.cat([p.grad_sample.reshape(6, -1) for p in optimizer.params], dim=1)
    assert torch.all(weighed.norm(dim=1) <= clip) and weighed[2].abs().max() == 0
    optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.reshape(-1) for p in optimizer.params])
    torch.testing.assert_close(summed, want, atol=1e-5, rtol=1e-4)
    # The loss-weighted alternative differs wherever the clip bites: the weight of a long gradient is lost.
    lossy = (clip / (weights[:, None] * plain).norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
    assert not torch.allclose((weights * lossy) @ plain, want, atol=1e-4)


def test_ghost_clipping_is_refused_with_weights_under_record_level_dp():
    with pytest.raises(ConfigError, match="grad-sample-mode = ghost"):
        RunConfig(dp="record", signals="rating", grad_sample_mode="ghost")
    RunConfig(dp="user", signals="rating", grad_sample_mode="ghost")  # no DP-SGD on the device: the loss is weighted


def test_dislikes_are_drawn_as_the_user_s_own_negatives(world):
    cfg = RunConfig(dp="user", num_negatives=5, dislike_negatives=2, eval_negatives=20)
    targets, dislikes = torch.tensor([0, 1, 2, 3]), torch.tensor([40, 41])
    candidates, _ = example_draws(targets, 60, cfg, torch.Generator().manual_seed(0), dislikes)
    assert candidates.shape == (4, 6) and torch.equal(candidates[:, 0], targets)
    assert torch.isin(candidates[:, 1:3], dislikes).all()
    plain, _ = example_draws(targets, 60, cfg, torch.Generator().manual_seed(0), torch.zeros(0, dtype=torch.long))
    assert plain.shape == (4, 6)  # a user without dislikes: uniform negatives, the same shape


def test_signals_change_how_a_device_trains_never_what_it_sends(world):
    root, _, dataset, content = world

    def one_round(name, **changes):
        cfg = RunConfig(eval_negatives=20, modalities="text", **changes)
        user = run_split(dataset, cfg).users[0]
        torch.manual_seed(0)
        global_state = shared_state(build_model(content, dataset.n_items, cfg))
        device = Device(dataset.user_ids[user.user], user, content, dataset.n_items, cfg, root / name)
        return device, device.train_round(global_state, 1, run_id="r")

    # Weights are used: all zero, the shared weights do not move (no DP noise to hide it).
    device, reply = one_round("zero", dp="none", signals="event", signal_weights="like=0,play=0,skip=0")
    assert all(float(v.abs().max()) == 0 for v in reply.delta.values())
    _, moved = one_round("plain", dp="none")
    assert any(float(v.abs().max()) > 0 for v in moved.delta.values())
    # Under record-level DP the reply and the ledger are the same with and without signals.
    fields = ("level", "round", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm", "details")
    sent = {}
    for name, changes in (("dp-plain", {}), ("dp-signals", {"signals": "rating"})):
        device, reply = one_round(name, dp="record", **changes)
        sent[name] = ({k: v.shape for k, v in reply.delta.items()}, reply.metrics,
                      [tuple(getattr(e, f) for f in fields) for e in device.state.ledger.entries])
    assert sent["dp-plain"] == sent["dp-signals"] and len(sent["dp-plain"][2]) == 2  # history release, DP-SGD
