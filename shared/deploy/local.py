"""A secured federation of real processes on this machine: one SuperLink and a SuperNode per device,
each a child in its own process group with its own FLWR_HOME and log. Used by tests and benchmark
scripts; `stop()` stops every process it started, by process id, and waits for their ports to close."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

from shared.deploy.commands import (
    register_command,
    run_command,
    superlink_command,
    supernode_command,
    write_flwr_home,
    write_run_config,
)
from shared.deploy.config import DeploySettings
from shared.processes import flower_env, free_port, port_in_use, reaped, stop_group, wait_for_port


class LocalFederation:
    def __init__(self, settings: DeploySettings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(write_flwr_home(settings))
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: list[int] = []

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.log(name), "wb") as log:
            # Under the reaper: a test or script killed mid-way leaves no SuperLink or SuperNode behind.
            process = subprocess.Popen(reaped(command), env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[name] = process
        return process

    def start_superlink(self) -> subprocess.Popen:
        process = self._start("superlink", superlink_command(self.settings), self.env)
        self.ports.append(self.settings.superlink.port)
        wait_for_port(self.settings.superlink.port, process, self.log("superlink"), "flower-superlink")
        return process

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        return subprocess.run(register_command(self.settings, public_key), env=self.env, capture_output=True, text=True)

    def start_supernode(self, name: str, command: list[str] | None = None, **kwargs) -> subprocess.Popen:
        """A SuperNode (its own FLWR_HOME, a free Runtime API port); kwargs go to supernode_command."""
        port = free_port()
        self.ports.append(port)
        command = command or supernode_command(self.settings, runtime_port=port, **kwargs)
        home = self.workdir / f"{name}-flwr-home"
        home.mkdir(exist_ok=True)
        return self._start(name, command, flower_env(home))

    def run(self, app_dir: Path, timeout: float) -> subprocess.CompletedProcess:
        """`flwr run APP NAME --run-config FILE --stream`; its output goes to flwr-run.log."""
        config = write_run_config(self.settings, self.workdir / "run-config.toml")
        started = time.perf_counter()
        with open(self.log("flwr-run"), "wb") as log:
            result = subprocess.run(run_command(self.settings, app_dir, config), env=self.env, cwd=app_dir,
                                    stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        self.run_seconds = time.perf_counter() - started
        return result

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):  # SuperNodes first, then the SuperLink
            stop_group(process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(port_in_use(p) for p in self.ports):
            time.sleep(0.5)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_on_loopback(root: Path, app_dir: Path, devices: int, users_per_device: int, run: dict,
                    node_config: Callable[[int], dict] | None = None) -> tuple:
    """One secured federation run end to end under `root`: slice MovieLens-100K (or the configured
    dataset) into `devices` directories, make a CA, SuperLink certificate and device keys, start the
    TLS SuperLink with node authentication and one SuperNode per device, register the keys, `flwr run`
    with the `run` settings (their `out` and `dataset` are set here), and stop everything.
    `node_config(k)` adds keys to device k's node config (fault injection in benchmarks: `partition-id`).
    Returns (the partition, the deployment settings); the run directory is `root / "run"`."""
    from shared.config import RunConfig
    from shared.data.resolve import resolve_dataset
    from shared.deploy.config import load_deploy_settings
    from shared.deploy.credentials import make_certificates, make_node_key
    from shared.deploy.partition import partition

    data = partition(resolve_dataset(RunConfig()), root / "data", devices, users_per_device)
    certs = make_certificates(root / "certs")
    keys = [make_node_key(root / "keys" / f"device-{k}") for k in range(devices)]
    settings = load_deploy_settings(table={
        "federation": {"flwr-home": str(root / "flwr-home")},
        "superlink": {"port": free_port(), "ca-cert": str(certs.ca_cert), "certificate": str(certs.server_cert),
                      "private-key": str(certs.server_key)},
        "run": {"min-clients": devices, **run, "dataset": str(data.catalogue), "out": str(root / "run")},
    })
    with LocalFederation(settings, root / "processes") as federation:
        federation.start_superlink()
        for key in keys:
            registered = federation.register(key.public)
            if registered.returncode != 0:
                raise RuntimeError(f"registering {key.public} failed: {registered.stderr[-2000:]}")
        for k in range(devices):
            federation.start_supernode(f"supernode-{k}", data_dir=data.devices[k], private_key=keys[k].private,
                                       extra_node_config=node_config(k) if node_config else None)
        result = federation.run(app_dir, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"flwr run failed: {federation.log('flwr-run').read_text()[-2000:]}")
    return data, settings


def save_report(name: str, report: dict) -> dict:
    """A deployment benchmark's figures: printed, and saved as runs/<name>.json beside the repository."""
    import json

    out = Path(__file__).resolve().parents[2] / "runs" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report
