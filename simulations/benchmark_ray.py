"""Seconds per round of the same federation on a one-node and on a two-node Ray cluster, both started on this
machine (127.0.0.1) in the same run, so the ratio holds on a busy machine.

- one node: a Ray head with all the CPUs (`--cpus`, default 2);
- two nodes: a head and a second node joining it, with half the CPUs each (the same total).
Both run `avrec simulate --ray-address` (Flower's simulation engine, one client actor per CPU) over the first
`--users` MovieLens-100K users for `--rounds` rounds, no baselines. Round 1 also starts the actors (torch,
the content cache), so the figure compared is the mean of the later rounds. Prints and saves
runs/ray_cluster.json; the runs and every node's logs stay in runs/ray_cluster-*/. Run: `python -m simulations.benchmark_ray [--users N] [--rounds R] [--set k=v]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from shared.config import load_config
from shared.deploy.local import save_report
from simulations.ray_cluster import local_cluster
from simulations.simulate import simulate


def cluster_run(cfg, cpus_per_node: list[int], root: Path) -> dict:
    """One federation on a fresh local cluster of these nodes: its rounds' seconds and where devices ran."""
    out = root / f"run-{len(cpus_per_node)}-nodes"
    started = time.perf_counter()
    with local_cluster(root / f"cluster-{len(cpus_per_node)}-nodes", cpus_per_node) as cluster:
        cluster_seconds = time.perf_counter() - started
        simulate(cfg.replace(out=str(out)), log=lambda *_: None, with_baselines=False, ray_address=cluster.address)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    later = [r["seconds"] for r in rounds[1:]]
    return {
        "cpus_per_node": cpus_per_node,
        "cluster_start_seconds": round(cluster_seconds, 1),
        "round_seconds": [r["seconds"] for r in rounds],
        "mean_seconds_after_round_1": round(sum(later) / len(later), 2) if later else None,
        "devices_per_node_last_round": sorted(rounds[-1]["ray_nodes"].values()),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100, help="first N MovieLens-100K users as clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the whole cluster (even: split over two nodes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.cpus < 2 or args.cpus % 2:
        parser.error(f"--cpus {args.cpus}: expected an even number >= 2 (two nodes share them equally)")
    overrides = dict(pair.split("=", 1) for pair in args.set)
    cfg = load_config(overrides={**overrides, "max-users": args.users, "num-rounds": args.rounds})
    report: dict = {"users": args.users, "rounds": args.rounds, "machine_cores": os.cpu_count(),
                    "settings": {**overrides, "dp": cfg.dp, "trust-model": cfg.trust_model, "modalities": cfg.modalities}}
    runs = Path(__file__).resolve().parents[1] / "runs"
    runs.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ray_cluster-", dir=runs))  # kept: the nodes' and Ray's logs, the runs
    report["workdir"] = str(root)
    report["one_node"] = cluster_run(cfg, [args.cpus], root)
    report["two_nodes"] = cluster_run(cfg, [args.cpus // 2] * 2, root)
    one, two = report["one_node"]["mean_seconds_after_round_1"], report["two_nodes"]["mean_seconds_after_round_1"]
    if one and two:
        report["two_nodes_over_one_node"] = round(two / one, 3)
    return save_report("ray_cluster", report)


if __name__ == "__main__":
    main()
