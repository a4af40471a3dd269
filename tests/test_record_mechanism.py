"""Record-level DP must protect the number of interactions too: nothing a device sends (the update's noise,
its ledger, its decline) may depend on n beyond what the ledger accounts for.

An outside review ran `train_local` 12 times each with n = 19 and n = 20 (both q = 0.5, 2 steps under the
old rate 1 / ceil(n / batch)): Opacus's divisor int(n * q) made the squared update norms perfectly
separated while the ledger entries were identical. These tests are that distinguisher and its like."""

from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import pytest
import torch

from client.device import Device
from client.trainer import train_local
from shared.config import RunConfig
from shared.features import ItemContent
from shared.model import build_model, is_private

N_ITEMS, CONTENT_DIM = 200, 384
# the review's setting: q = 0.5 and 2 steps, which the old code derived from batch 10 for n = 19 and 20
CFG = RunConfig(dp="record", batch_size=10, record_sample_rate=0.5, record_steps=2, embedding_dim=64)
RUNS = 12


@pytest.fixture(scope="module")
def content() -> ItemContent:
    g = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(N_ITEMS, CONTENT_DIM, generator=g), dim=-1)
    return ItemContent({"text": rows}, torch.ones(N_ITEMS, 1), 0, 0.0)


def shared_params(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if p.requires_grad and not is_private(name)]


def squared_update_norms(content: ItemContent, n: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """||update||^2 of the shared weights over RUNS runs on the first n of one fixed interaction list
    (`weights`: behaviour-signal weights of those n interactions)."""
    items = torch.randint(0, N_ITEMS, (400,), generator=torch.Generator().manual_seed(1)).numpy()[:n]
    history = torch.nn.functional.normalize(torch.randn(1, CONTENT_DIM, generator=torch.Generator().manual_seed(2)), dim=-1)
    norms = []
    for _ in range(RUNS):
        torch.manual_seed(0)
        model = build_model(content, N_ITEMS, CFG)
        before = torch.cat([p.detach().reshape(-1).clone() for p in shared_params(model)])
        train_local(model, items, history, CFG, secrets.randbits(62), dp=True, weights=weights)
        after = torch.cat([p.detach().reshape(-1) for p in shared_params(model)])
        norms.append(float((after - before).pow(2).sum()))
    return np.array(norms), int(before.numel())


@pytest.mark.parametrize("n", [19, 20, 21, 64, 300])
def test_the_update_carries_the_noise_the_ledger_records_whatever_n(content, n):
    norms, d = squared_update_norms(content, n)
    # Per step each shared coordinate gets lr * sigma * C / divisor of Gaussian noise; the signal (at most
    # lr * batch * C / divisor per step, over tens of thousands of coordinates) is a fraction of a percent.
    expected = CFG.record_steps * d * (CFG.learning_rate * CFG.noise_multiplier * CFG.clip_norm / CFG.batch_size) ** 2
    assert d > 20_000
    assert norms.mean() / expected == pytest.approx(1.0, abs=0.03), (n, norms.mean(), expected)


@pytest.mark.parametrize("pair", [(19, 20), (20, 21), (63, 64)])
def test_neighbouring_interaction_counts_are_not_separated(content, pair):
    a, _ = squared_update_norms(content, pair[0])
    b, _ = squared_update_norms(content, pair[1])
    # The old code separated them perfectly; for one distribution the chance is 2 / C(24, 12) < 1e-6.
    assert a.min() < b.max() and b.min() < a.max(), (pair, sorted(a), sorted(b))


@pytest.mark.parametrize("extra_weight", [0.0, 0.5])
def test_with_behaviour_signals_one_more_interaction_is_not_separated(content, extra_weight):
    """Signals weigh each example's clipped gradient on the device (a skip or dislike weighs 0): one more
    interaction, of whatever weight, must not change the noise the update carries."""
    weights = np.random.default_rng(4).choice([0.0, 0.5, 1.0], 21)
    weights[-1] = extra_weight
    a, d = squared_update_norms(content, 20, weights[:20])
    b, _ = squared_update_norms(content, 21, weights)
    assert a.min() < b.max() and b.min() < a.max(), (sorted(a), sorted(b))
    expected = CFG.record_steps * d * (CFG.learning_rate * CFG.noise_multiplier * CFG.clip_norm / CFG.batch_size) ** 2
    assert a.mean() / expected == pytest.approx(1.0, abs=0.03) and b.mean() / expected == pytest.approx(1.0, abs=0.03)


def _devices(world, tmp_path, **changes) -> list[Device]:
    """Two devices of one user whose training histories differ in length (n and n - 5)."""
    dataset, split, content = world
    cfg = RunConfig(**{"eval_negatives": 49, "dp": "record", **changes})
    user = split.users[0]
    shorter = dataclasses.replace(user, train=user.train[:-5])
    return [Device(dataset.user_ids[user.user], u, content, dataset.n_items, cfg, tmp_path / name)
            for name, u in (("long", user), ("short", shorter))]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from shared.data.dataset import load_dataset
    from shared.data.split import leave_one_out
    from shared.data.synthetic import write_planted_dataset
    from shared.features import item_content

    root = tmp_path_factory.mktemp("mechanism")
    dataset = load_dataset(write_planted_dataset(root / "data", n_users=3, n_items=90, interactions_per_user=30, seed=3))
    split = leave_one_out(dataset, 0, n_negatives=49)
    return dataset, split, item_content(dataset, ["text"], root / "cache")


def _public(entry) -> dict:
    # what an entry says, without the chain fields and the wall-clock time
    return {k: v for k, v in entry.to_dict().items() if k not in ("hash", "prev_hash", "signature", "timestamp")}


def test_ledgers_heads_and_declines_do_not_depend_on_n(world, tmp_path):
    from shared.model import shared_state

    long, short = _devices(world, tmp_path, epsilon_budget=9.0)
    torch.manual_seed(0)
    global_state = shared_state(build_model(long.content, long.n_catalogue, long.cfg))
    declined_at = {}
    for device in (long, short):
        for server_round in range(1, 30):
            reply = device.train_round(global_state, server_round)
            assert set(reply.metrics) == {"declined"}  # nothing else leaves the device
            if reply.delta is None:
                declined_at[device.state.root.name] = (server_round, reply.declined.split(": ", 1)[1])
                break
    assert declined_at["long"] == declined_at["short"], declined_at
    assert [_public(e) for e in long.state.ledger.entries] == [_public(e) for e in short.state.ledger.entries]
    assert long.state.ledger_head()["entries"] == short.state.ledger_head()["entries"]
    assert not any("examples" in e.details for e in long.state.ledger.entries)


def test_the_history_is_released_on_schedule_not_when_it_changes(world, tmp_path):
    from shared.model import shared_state

    long, short = _devices(world, tmp_path, history_refresh_rounds=3)
    torch.manual_seed(0)
    global_state = shared_state(build_model(long.content, long.n_catalogue, long.cfg))
    for server_round in (1, 2):
        short.train_round(global_state, server_round)
    # the history grows between rounds (the same device, now with five more interactions)
    grown = Device(short.user_id, long.split, long.content, long.n_catalogue, long.cfg, short.state.root)
    for server_round in (3, 4, 5, 7):
        grown.train_round(global_state, server_round)
    releases = [e.round for e in grown.state.ledger.entries if e.mechanism == "gaussian-history-release"]
    assert releases == [1, 4, 7]
