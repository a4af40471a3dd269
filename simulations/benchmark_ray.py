"""Seconds per round of the same federation on a one-node and on a two-node Ray cluster, both started on this
machine (simulations/ray_cluster.py) in the same run, so the ratio holds on a busy machine.

- one node: a Ray head with all the CPUs (`--cpus`, default 2);
- two nodes: a head and a second node joining it, with half the CPUs each (the same total).
Both run `avrec simulate --ray-address` (Flower's simulation engine, one client actor per CPU) over the first
`--users` MovieLens-100K users for `--rounds` rounds, no baselines. Round 1 also starts the actors (torch,
the content cache), so the figure compared is the mean of the later rounds. The runs alternate one, two, two,
one nodes (`--repeats` such blocks), so a load that drifts during the benchmark weighs on both alike; the
ratio compares the medians. Prints and saves runs/ray_cluster.json; the runs and every node's logs stay in
runs/ray_cluster-*/. Run: `python -m simulations.benchmark_ray [--users N] [--rounds R] [--repeats K] [--set k=v]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from shared.config import load_config
from shared.deploy.local import save_report
from simulations.ray_cluster import local_cluster
from simulations.simulate import simulate


def cluster_run(cfg, cpus_per_node: list[int], workdir: Path) -> dict:
    """One federation on a fresh local cluster of these nodes: its rounds' seconds and where devices ran."""
    out = workdir / "run"
    started = time.perf_counter()
    with local_cluster(workdir / "cluster", cpus_per_node) as cluster:
        cluster_seconds = time.perf_counter() - started
        simulate(cfg.replace(out=str(out)), log=lambda *_: None, with_baselines=False, ray_address=cluster.address)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    later = [r["seconds"] for r in rounds[1:]]
    return {
        "cpus_per_node": cpus_per_node,
        "cluster_start_seconds": round(cluster_seconds, 1),
        "round_seconds": [r["seconds"] for r in rounds],
        "mean_seconds_after_round_1": round(sum(later) / len(later), 2),
        "devices_per_node_last_round": sorted(rounds[-1]["ray_nodes"].values()),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100, help="first N MovieLens-100K users as clients")
    parser.add_argument("--rounds", type=int, default=3, help="at least 2 (round 1 is not compared)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the whole cluster (even: split over two nodes)")
    parser.add_argument("--repeats", type=int, default=1, help="blocks of four runs (one, two, two, one nodes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: expected at least 2 (round 1 also starts the actors and is not compared)")
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
    layouts = {"one_node": [args.cpus], "two_nodes": [args.cpus // 2] * 2}
    report.update({name: [] for name in layouts})
    for i, name in enumerate(("one_node", "two_nodes", "two_nodes", "one_node") * args.repeats):
        report[name].append(cluster_run(cfg, layouts[name], root / f"{i}-{name}"))
    medians = {name: statistics.median(r["mean_seconds_after_round_1"] for r in report[name]) for name in layouts}
    report["median_seconds_per_round_after_round_1"] = medians
    report["two_nodes_over_one_node"] = round(medians["two_nodes"] / medians["one_node"], 3)
    return save_report("ray_cluster", report)


if __name__ == "__main__":
    main()
