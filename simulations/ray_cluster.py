"""A Ray cluster of several nodes on this machine (127.0.0.1), for the test and the benchmark of
`avrec simulate --ray-address`.

Each node is `ray start --block` run under the reaper (shared/reaper.py) in a session of its own, so the node
and everything it starts (GCS, raylet, dashboard agent, workers) are stopped by process id when the cluster
is left, when its owner dies, or when a test fails; never by `ray stop`, which stops every Ray process of
every user on the machine. Two raylets on one host cannot share fixed ports, so every port a node opens is
a free one chosen here. The nodes share one temporary directory (Ray keeps one session per cluster there), a
short one under the system's temporary directory (Ray's socket paths must fit in 107 bytes), removed on exit;
each node's own output stays in WORKDIR/node-I.log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
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

    def node_ids(self, timeout: float = 60.0) -> list[str]:
        """The ids of the cluster's live nodes, as Ray reports them (asked from a separate driver process)."""
        script = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                  "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % self.address)
        done = subprocess.run(reaped([flower_bin("python"), "-c", script]), env=flower_env(), capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not list the nodes of the Ray cluster at {self.address}: {done.stderr[-500:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def local_cluster(workdir: Path, cpus_per_node: list[int], object_store_mb: int = 256,
                  timeout: float = 120.0) -> Iterator[LocalCluster]:
    """A head node and len(cpus_per_node) - 1 nodes joining it, each with that many CPUs; yields once every
    node has joined. Every node is stopped on exit, however the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cluster = LocalCluster(f"127.0.0.1:{port}", workdir)
    ray_temp = tempfile.mkdtemp(prefix="avrec-ray-")
    try:
        for i, cpus in enumerate(cpus_per_node):
            role = ["--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
                    "--include-dashboard", "false"] if i == 0 else ["--address", cluster.address]
            command = [flower_bin("ray"), "start", "--block", *role, "--node-ip-address", "127.0.0.1",
                       "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(object_store_mb << 20),
                       "--temp-dir", ray_temp, "--disable-usage-stats",
                       *(arg for name in NODE_PORTS for arg in (f"--{name}", str(free_port())))]
            with open(workdir / f"node-{i}.log", "wb") as log:
                cluster.nodes.append(subprocess.Popen(reaped(command), env=flower_env(), stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True))
            wait_for_nodes(cluster, i + 1, timeout)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):  # workers first, then the head
            stop_group(node)
        shutil.rmtree(ray_temp, ignore_errors=True)


def wait_for_nodes(cluster: LocalCluster, count: int, timeout: float) -> None:
    """Until `count` nodes are alive in the cluster; RuntimeError naming the node's log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        exited = [i for i, node in enumerate(cluster.nodes) if node.poll() is not None]
        if exited:
            raise RuntimeError(f"ray node {exited[0]} exited; see {cluster.workdir / f'node-{exited[0]}.log'}")
        try:
            if len(cluster.node_ids(timeout=min(30.0, max(1.0, deadline - time.monotonic())))) >= count:
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} ray node(s) did not join {cluster.address} within {timeout:.0f} s; "
                               f"see {cluster.workdir}/node-*.log")
        time.sleep(1.0)
