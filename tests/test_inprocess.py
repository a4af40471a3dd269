"""The in-process engine's fast path gives what the Flower path gives: each device's round computed in a
batched cohort equals `Device.train_round` (noise-free: without DP and under user-level DP, whose noise is
added after the device's update), and a whole run equals the same run on Flower's simulation engine."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from client.device import Device
from client.state import DeviceState
from shared.config import RunConfig, load_config
from shared.data.dataset import load_dataset
from shared.data.split import leave_one_out
from shared.data.synthetic import write_planted_dataset
from shared.features import item_content
from shared.model import build_model, shared_state
from shared.updates import update_norm
from simulations.cohort import train_cohort
from simulations.simulate import simulate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    dataset = load_dataset(write_planted_dataset(root / "data", n_users=10, n_items=90, interactions_per_user=25, seed=3))
    split = leave_one_out(dataset, 0, n_negatives=49)
    return root, dataset, split, item_content(dataset, ["text"], root / "cache")


def devices(world, name, cfg):
    root, dataset, split, content = world
    users = split.users
    if cfg.signals != "none":  # behaviour signals: weights in [0, 1] (some 0) and dislikes, different per user
        rng = np.random.default_rng(5)
        users = [replace(u, weights=rng.choice([0.0, 0.3, 1.0], len(u.train)), dislikes=u.train[: i % 3]) for i, u in enumerate(users)]
    return [Device(dataset.user_ids[u.user], u, content, dataset.n_items, cfg, root / name / str(i))
            for i, u in enumerate(users)]


@pytest.mark.parametrize("dp, signals, fit", [("none", "none", 0), ("user", "none", 0), ("user", "rating", 0),
                                             ("user", "rating", 4)])
def test_a_cohort_trains_every_device_as_it_would_alone(world, dp, signals, fit, monkeypatch):
    root, dataset, split, content = world
    # local-epochs 2 and unequal histories: devices stop at different steps; a cohort of 4 splits the 10 devices.
    # With signals: weighted losses, and 2 of each example's negatives from the user's dislikes where it has any.
    # With fit: each private vector first fitted to the global weights (client/private_fit.py).
    cfg = RunConfig(eval_negatives=49, dp=dp, local_epochs=2, batch_size=4, modalities="text", signals=signals,
                    dislike_negatives=2 if signals != "none" else 0, private_fit_steps=fit)
    dp = f"{dp}-{signals}-{fit}"
    # L-BFGS's line search carries the batched steps' last-bit rounding a little further
    atol = 1e-5 if fit else 1e-6
    monkeypatch.setattr("simulations.cohort.COHORT", 4)
    torch.manual_seed(0)
    global_state = shared_state(build_model(content, dataset.n_items, cfg))
    for server_round in (1, 2):  # round 2 starts from the private vectors each path saved in round 1
        alone = [d.train_round(global_state, server_round) for d in devices(world, f"alone-{dp}", cfg)]
        batched = train_cohort(devices(world, f"batched-{dp}", cfg), global_state, server_round)
        for a, b in zip(alone, batched):
            assert a.metrics.keys() == b.metrics.keys() and a.evaluation.keys() == b.evaluation.keys()
            assert a.evaluation == pytest.approx(b.evaluation, abs=1e-5)
            for k in global_state:
                torch.testing.assert_close(a.delta[k], b.delta[k], atol=atol, rtol=1e-5)
        for i in range(len(split.users)):
            private_a = DeviceState(root / f"alone-{dp}" / str(i)).load_private()
            private_b = DeviceState(root / f"batched-{dp}" / str(i)).load_private()
            assert private_a.keys() == private_b.keys()
            for k in private_a:
                torch.testing.assert_close(private_a[k], private_b[k], atol=atol, rtol=1e-5)
    if cfg.user_dp:
        assert all(update_norm(r.delta) <= cfg.user_clip_norm * (1 + 1e-6) for r in batched)


def test_the_inprocess_engine_gives_the_flower_engine_s_model(tmp_path):
    data = write_planted_dataset(tmp_path / "data", n_users=12, n_items=60, n_clusters=3, interactions_per_user=15, seed=4)
    runs = {}
    for engine in ("flower", "inprocess"):
        cfg = load_config(overrides={
            "dataset": str(data), "out": str(tmp_path / engine), "cache-dir": str(tmp_path / "cache"),
            "num-rounds": 2, "eval-negatives": 29, "dp": "none", "modalities": "text",
        })
        runs[engine] = simulate(cfg, log=lambda *_: None, engine=engine)
    flower, inprocess = (load_file(tmp_path / e / "global_model.safetensors") for e in ("flower", "inprocess"))
    assert flower.keys() == inprocess.keys()
    for k in flower:
        torch.testing.assert_close(flower[k], inprocess[k], atol=1e-5, rtol=1e-4)
    rounds = {e: [json.loads(line) for line in (tmp_path / e / "rounds.jsonl").read_text().splitlines()] for e in runs}
    for a, b in zip(rounds["flower"], rounds["inprocess"]):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6) and a["clients_aggregated"] == b["clients_aggregated"] == 12
    for protocol, table in runs["flower"]["systems"]["avrec (federated)"].items():
        assert table == pytest.approx(runs["inprocess"]["systems"]["avrec (federated)"][protocol], abs=1e-6)
