"""A Ray cluster of several nodes on this machine, for the test and the benchmark of `avrec simulate
--ray-address`. Its address is 127.0.0.1:PORT; the nodes register under the machine's own address (Ray maps a
loopback node address to it: ray/_private/services.py, resolve_ip_for_localhost).

Each node is `ray start --block` run under the reaper (shared/reaper.py) in a session of its own, so the node
and everything it starts (GCS, raylet, dashboard agent, workers) are stopped by process id when the cluster
is left, when its owner dies, or when a test fails; never by `ray stop`, which stops every Ray process of
every user on the machine. Two raylets on one host cannot share fixed ports, so every port a node opens is
a free one chosen here. The nodes share one temporary directory (Ray keeps one session per cluster there), a
short one under the system's temporary directory (Ray's socket paths must fit in 107 bytes), removed on exit;
each node's output stays in WORKDIR/node-I.log and Ray's own logs are moved to WORKDIR/ray-logs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shared.processes import flower_bin, flower_env, free_port, reaped, stop_group

# Ports `ray start` would otherwise take at fixed defaults (two nodes on one host would collide).
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")


@dataclass
class LocalCluster:
    address: str  # the head's GCS address, HOST:PORT: what `avrec simulate --ray-address` takes
    workdir: Path
    nodes: list[subprocess.Popen] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)  # as Ray lists its live nodes once all have joined


@contextmanager
def local_cluster(workdir: Path, cpus_per_node: list[int], object_store_mb: int = 256,
                  timeout: float = 120.0) -> Iterator[LocalCluster]:
    """A head node and len(cpus_per_node) - 1 nodes joining it, each with that many CPUs; yields once Ray
    lists every node alive. Every node is stopped on exit, however the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cluster = LocalCluster(f"127.0.0.1:{port}", workdir)
    ray_temp = tempfile.mkdtemp(prefix="avrec-ray-")
    try:
        for i, cpus in enumerate(cpus_per_node):
            role = ["--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
                    "--include-dashboard", "false"] if i == 0 else ["--address", cluster.address]
            command = [flower_bin("ray"), "start", "--block", *role, "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(object_store_mb << 20),
                       "--temp-dir", ray_temp, "--disable-usage-stats",
                       *(arg for name in NODE_PORTS for arg in (f"--{name}", str(free_port())))]
            log = workdir / f"node-{i}.log"
            with open(log, "wb") as sink:
                node = subprocess.Popen(reaped(command), env=flower_env(), stdout=sink, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            cluster.nodes.append(node)
            wait_for_start(node, log, timeout)
        cluster.node_ids = live_nodes(cluster.address, timeout)
        if len(cluster.node_ids) != len(cpus_per_node):
            raise RuntimeError(f"Ray lists {len(cluster.node_ids)} live node(s) at {cluster.address}, "
                               f"{len(cpus_per_node)} were started; see {workdir}/node-*.log")
        yield cluster
    finally:
        with ThreadPoolExecutor() as pool:  # every node at once: each waits out its own grace period
            list(pool.map(stop_group, cluster.nodes))
        logs = Path(ray_temp) / "session_latest" / "logs"
        if logs.is_dir():  # Ray's own logs (raylets, GCS, workers) stay with the node logs
            shutil.move(logs.resolve(), workdir / "ray-logs")
        shutil.rmtree(ray_temp, ignore_errors=True)


def wait_for_start(node: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `ray start` says its node runs (it then blocks); RuntimeError naming its log otherwise."""
    deadline = time.monotonic() + timeout
    while b"Ray runtime started" not in log.read_bytes():
        if node.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {node.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"`ray start` did not start its node within {timeout:.0f} s; see {log}")
        time.sleep(0.5)


def live_nodes(address: str, timeout: float) -> list[str]:
    """The ids of the live nodes of the cluster at `address`, asked from a driver process of its own."""
    script = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
              "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % address)
    done = subprocess.run(reaped([sys.executable, "-c", script]), env=flower_env(), capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not list the nodes of the Ray cluster at {address}: {done.stderr[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
