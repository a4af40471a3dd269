"""A real federation through Flower's simulation engine (SuperLink, `flwr run`, Ray workers) on data
with a planted preference: the DP federated model must beat popularity, every output must be written,
and no process may outlive the run."""

import json
import os

import pytest
from safetensors.torch import load_file

from shared.config import load_config
from shared.data.synthetic import write_planted_dataset
from shared.privacy.ledger import PrivacyLedger
from simulations.engine import descendants
from simulations.simulate import simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = write_planted_dataset(root / "planted", n_users=24, n_items=90, n_clusters=3, interactions_per_user=20, seed=0)
    cfg = load_config(overrides={
        "dataset": str(data), "out": str(root / "run"), "cache-dir": str(root / "cache"),
        "num-rounds": 4, "eval-negatives": 49, "dp": "record", "server-learning-rate": 10.0,
        "messages-in-flight": 5,  # fewer than the 24 clients: the server refills its window as replies come
        "progress-seconds": 0.01,  # a line on every poll that finds the round unfinished
    })
    # `flwr run --stream` writes the ServerApp's log to our file descriptor 1: keep it for the progress test.
    stream = root / "stream.log"
    saved = os.dup(1)
    try:
        with open(stream, "wb") as sink:
            os.dup2(sink.fileno(), 1)
            summary = simulate(cfg, log=lambda *_: None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return root / "run", summary, stream.read_text(errors="replace")


def test_dp_federation_beats_popularity_on_planted_data(run):
    _, summary, _ = run
    fed = summary["systems"]["avrec (federated)"]["sampled-99"]["hr@10"]
    pop = summary["systems"]["popularity"]["sampled-99"]["hr@10"]
    assert fed > pop + 0.15, (fed, pop)


def test_run_directory_holds_every_output(run):
    out, summary, _ = run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["systems"].keys() == {"avrec (federated)", "popularity", "central, no DP"}
    for system in on_disk["systems"].values():
        assert set(system["full"]) == {"hr@10", "ndcg@10", "recall@20"}
        assert set(system["sampled-99"]) == {"hr@10", "ndcg@10"}
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["clients_aggregated"] == 24 for r in rounds)
    weights = load_file(out / "global_model.safetensors")
    assert "items.bias.weight" in weights and not any("user_vector" in k for k in weights)
    record = on_disk["privacy"]["record_level"]
    assert record["clients"] == 24 and 0 < record["median"] <= record["max"] < float("inf")
    # The learned fusion weights are reported (one modality here, so its weight is 1).
    assert on_disk["modality_weights"]["avrec (federated)"] == pytest.approx({"text": 1.0})
    assert on_disk["media_failures"] == {"failed": {}, "examples": {}}
    assert on_disk["peak_memory_bytes"] > 0 and on_disk["versions"]["flwr"] == "1.41.0"


def test_device_ledgers_record_every_round(run):
    out, summary, _ = run
    devices = sorted((out / "devices").iterdir())
    assert len(devices) == 24
    ledger = PrivacyLedger(devices[0] / "privacy-ledger.jsonl", level="record")
    mechanisms = [e.mechanism for e in ledger.entries]
    assert mechanisms.count("dp-sgd") == 4 and mechanisms.count("gaussian-history-release") == 1
    assert (devices[0] / "private.safetensors").exists()


def test_no_process_outlives_the_run(run):
    assert descendants(os.getpid()) == []


def test_rounds_report_progress_while_devices_answer(run):
    *_, stream = run
    lines = [line for line in stream.splitlines() if "devices answered" in line]
    assert lines, stream[-2000:]
    assert any("round 1: " in line and "/24 devices answered" in line for line in lines), lines[:5]
