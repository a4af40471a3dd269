"""The server's checkpoint (server/checkpoint.py) and the ledger's run-scoped rounds, without Flower: what a
resumed run restores, what it refuses, and how a device ledger spans runs."""

import pytest
import torch

from server.aggregate import ServerOptimizer
from server.checkpoint import CHECKPOINT, CheckpointError, RunState, begin, client_names, first_round, load, save
from shared.config import RunConfig
from shared.privacy.ledger import LedgerError, PrivacyLedger
from shared.privacy.participation import participation, user_epsilon

WEIGHTS = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.bias": torch.ones(3)}


def test_a_fresh_run_refuses_a_directory_holding_a_run_and_a_resume_restores_it(tmp_path):
    cfg = RunConfig(out=str(tmp_path), server_optimizer="adam", num_rounds=2)
    optimizer = ServerOptimizer("adam", 0.1)
    state, weights = begin(tmp_path, cfg, optimizer, lambda: WEIGHTS)
    assert state.round == 0 and weights is WEIGHTS and len(state.run_id) == 16
    weights = optimizer.step(weights, {k: torch.full_like(v, 0.5) for k, v in weights.items()})
    state.round, state.rounds, state.chosen = 1, [{"round": 1, "metrics": {"x": float("nan")}}], {"7": 1}
    save(tmp_path, state, weights, {"m": optimizer.m, "v": optimizer.v})
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind

    with pytest.raises(CheckpointError, match="already holds a run"):
        begin(tmp_path, cfg, ServerOptimizer("adam", 0.1), lambda: WEIGHTS)
    resumed = ServerOptimizer("adam", 0.1)
    again, restored = begin(tmp_path, cfg.replace(resume=True, num_rounds=5), resumed, lambda: WEIGHTS)
    assert (again.run_id, again.round, again.chosen) == (state.run_id, 1, {"7": 1})
    assert again.config["num-rounds"] == 5
    for k in WEIGHTS:
        assert torch.equal(restored[k], weights[k])
        assert torch.equal(resumed.m[k], optimizer.m[k]) and torch.equal(resumed.v[k], optimizer.v[k])
    with pytest.raises(CheckpointError, match="learning-rate = 0.1, the run has 0.5"):
        load(tmp_path, cfg.replace(resume=True, learning_rate=0.1))


def test_a_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="never completed a round"):
        begin(tmp_path, RunConfig(out=str(tmp_path), resume=True), ServerOptimizer("sgd", 1.0), lambda: WEIGHTS)


def test_new_node_ids_take_the_old_clients_names_only_when_they_are_interchangeable():
    alike = RunState("r", round=2, chosen={"1": 2, "2": 2}, last_round={"1": 2, "2": 2}, clients=[1, 2])
    assert client_names(alike, [1, 2], 1.0) == {1: 1, 2: 2}  # the same nodes (a deployment's SuperLink kept)
    assert client_names(alike, [20, 10], 1.0) == {10: 1, 20: 2}  # a new simulation: new random ids
    unlike = RunState("r", round=2, chosen={"1": 2, "2": 1}, last_round={"1": 2, "2": 1}, clients=[1, 2])
    with pytest.raises(CheckpointError, match="under-counting"):
        client_names(unlike, [10, 20], 1.0)
    assert client_names(unlike, [10, 20], 0.5) == {10: 1, 20: 2}  # amplified rounds charge everyone alike


def test_a_round_the_ledger_charged_after_the_checkpoint_is_never_charged_again(tmp_path):
    ledger = PrivacyLedger(tmp_path / "server-ledger.jsonl", level="user")
    for r in (1, 2, 3):
        ledger.append(round=r, mechanism="dp-fedavg", noise_multiplier=1.0, sample_rate=1.0, steps=1, clip_norm=1.0,
                      sampling="all-clients", amplification=False, neighbouring="user")
    assert first_round(RunState("r", round=2), ledger) == 4
    assert first_round(RunState("r", round=2), None) == 3


def test_device_ledger_rounds_are_ordered_within_a_run_and_start_afresh_in_the_next(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.jsonl", level="record")

    def append(r: int, run: str) -> None:
        ledger.append(round=r, mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=0.5, steps=1, clip_norm=1.0,
                      sampling="poisson-csprng", amplification=True, neighbouring="record", details={"run": run})

    append(4, "first")
    append(1, "second")  # a new run on a device whose state persists
    append(2, "second")
    with pytest.raises(LedgerError, match="round 1 is before the last recorded round 2 of run second"):
        append(1, "second")
    with pytest.raises(LedgerError, match="round 3 is before the last recorded round 4 of run first"):
        append(3, "first")


def test_a_resumed_user_level_run_is_accounted_as_the_uninterrupted_one(tmp_path):
    """With DP a resumed run must end with the same accounting: the simulation's new node ids take the old
    clients' names, so each user's history continues instead of starting afresh."""
    def ledger_of(name: str, rounds: list[list[int]]) -> PrivacyLedger:
        ledger = PrivacyLedger(tmp_path / name, level="user")
        for r, participants in enumerate(rounds, start=1):
            ledger.append(round=r, mechanism="dp-fedavg", noise_multiplier=1.0, sample_rate=1.0, steps=1,
                          clip_norm=1.0, sampling="all-clients", amplification=False, neighbouring="user",
                          details={"participants": participants})
        return ledger

    whole = user_epsilon(ledger_of("whole.jsonl", [[1, 2]] * 3).entries, 1e-5).epsilon
    before = ledger_of("resumed.jsonl", [[1, 2]] * 2)
    state = RunState("r", round=2, chosen=dict(participation(before.entries)), last_round={"1": 2, "2": 2}, clients=[1, 2])
    names = client_names(state, [10, 20], 1.0)
    resumed = ledger_of("resumed-3.jsonl", [[1, 2]] * 2 + [sorted(names[n] for n in (10, 20))])
    assert user_epsilon(resumed.entries, 1e-5).epsilon == whole
    # Under the new ids themselves each user would be charged for 2 of the 3 rounds only.
    naive = ledger_of("naive.jsonl", [[1, 2]] * 2 + [[10, 20]])
    assert user_epsilon(naive.entries, 1e-5).epsilon < whole


def test_the_best_model_is_the_one_its_round_measured(tmp_path):
    """A round's metrics are the devices' ranking with the weights they received, so the best model is those
    weights, not the ones the round's aggregation made after."""
    from safetensors.torch import load_file

    from server.records import RunRecorder

    recorder = RunRecorder(tmp_path)
    for server_round, hr in ((1, 0.2), (2, 0.5), (3, 0.4)):
        recorder.round(server_round, [{"sampled-99/val/hr@10": hr}], seconds=1.0, sampled=1, aggregated=1,
                       declined=[], rejected=[], failed=[], user_epsilon=None)
        sent, after = {"w": torch.full((2,), float(server_round))}, {"w": torch.full((2,), server_round + 0.5)}
        recorder.checkpoint(after, sent)
    assert torch.equal(load_file(tmp_path / "best_model.safetensors")["w"], torch.full((2,), 2.0))
    assert torch.equal(load_file(tmp_path / "global_model.safetensors")["w"], torch.full((2,), 3.5))
