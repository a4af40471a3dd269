"""`avrec simulate --ray-address`: Flower's simulation engine runs its clients on an existing Ray cluster, here
two Ray nodes on this machine started by the test itself and joined through 127.0.0.1 (one CPU each, so Flower
places one client actor on each), and the devices really ran on both: each device names the Ray node it ran on, and rounds.jsonl counts
them. Both nodes are stopped by process id, whether the test passes or fails."""

import json
import os
import time
from pathlib import Path

import pytest

from shared.cli import main
from shared.config import load_config
from shared.data.synthetic import write_planted_dataset
from shared.processes import alive, descendants, free_port
from simulations.ray_cluster import local_cluster
from simulations.simulate import simulate

CLIENTS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    return write_planted_dataset(root / "planted", n_users=CLIENTS, n_items=24, n_clusters=2,
                                 interactions_per_user=8, seed=0)


def actors(cluster) -> list[int]:
    """Flower's client actor processes (Ray titles them ray::ClientAppActor) under the cluster's nodes."""
    pids = [p for node in cluster.nodes for p in descendants(node.pid)]
    return [p for p in pids if alive(p) and b"ClientAppActor" in read_cmdline(p)]


def read_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_clients_run_on_both_nodes_of_a_two_node_ray_cluster(data, tmp_path):
    cfg = load_config(overrides={
        "dataset": str(data), "out": str(tmp_path / "run"), "cache-dir": str(tmp_path / "cache"),
        "num-rounds": 2, "eval-negatives": 9, "dp": "none", "modalities": "text",
    })
    with local_cluster(tmp_path / "cluster", cpus_per_node=[1, 1]) as cluster:
        nodes = cluster.node_ids
        summary = simulate(cfg, log=lambda *_: None, with_baselines=False, ray_address=cluster.address)
        # The run's client actors end with it; the cluster's own processes are not the run's and stay.
        deadline = time.monotonic() + 60
        while actors(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert actors(cluster) == [] and all(alive(node.pid) for node in cluster.nodes)
    assert len(set(nodes)) == 2
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients_aggregated"] == CLIENTS
        # Every device names a node of this cluster, and each node ran at least one device in every round.
        assert set(r["ray_nodes"]) == set(nodes) and sum(r["ray_nodes"].values()) == CLIENTS, r["ray_nodes"]
    assert summary["federated"]["rounds_run"] == 2
    # Both nodes and everything they started are gone (the cluster is left before these lines run).
    assert not any(alive(node.pid) for node in cluster.nodes)
    assert descendants(os.getpid()) == []


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:{port}", "no Ray cluster could be reached there"),
    ("ray://127.0.0.1:10001", "expected HOST:PORT"),
    ("127.0.0.1", "expected HOST:PORT"),
])
def test_an_unreachable_or_malformed_ray_address_is_one_line_and_starts_nothing(data, tmp_path, capsys, address, expected):
    address = address.format(port=free_port())  # nothing listens on a port just found free
    status = main(["simulate", "--dataset", str(data), "--out", str(tmp_path / "run"), "--ray-address", address])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and expected in err and address in err, err
    assert not (tmp_path / "run").exists()
    assert descendants(os.getpid()) == []


def test_a_ray_address_needs_flower_s_engine(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--dataset", str(data), "--out", str(tmp_path / "run"), "--engine", "inprocess",
              "--ray-address", "127.0.0.1:6379"])
    assert exit_.value.code == 2 and "only Flower's engine runs on a Ray cluster" in capsys.readouterr().err
