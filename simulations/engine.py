"""Runs the avrec Flower app on Flower's simulation engine, as `flwr run` does, and cleans up after it.

A private SuperLink (simulation mode, loopback, free ports, its own FLWR_HOME) is started as our child
in its own process group, the app is submitted with `flwr run <repo> avrec --stream`, and when the run
ends (or fails, or is interrupted) the whole group is stopped by process id: nothing is left running. Both
run under the reaper (shared/reaper.py), so even a kill -9 of this process leaves nothing behind.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.processes import TreeMemory, descendants, flower_bin, flower_env, free_port, reaped, stop_group, wait_for_port

__all__ = ["EngineError", "TreeMemory", "check_ray_address", "descendants", "run_app", "toml_value"]

REPO = Path(__file__).resolve().parents[1]


class EngineError(UserError, RuntimeError):
    """The Flower engine failed; the message names the log to read."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def check_ray_address(address: str, timeout: float = 5.0) -> str:
    """`address` (HOST:PORT of a Ray head node's GCS) when something there accepts connections; EngineError
    otherwise, before any run starts."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        raise EngineError(f"--ray-address {address!r}: expected HOST:PORT, the GCS address of a running Ray cluster's "
                          "head node (`ray start --head --port PORT` prints it); Ray Client (ray://) addresses are not "
                          "supported: run avrec on a node of the cluster")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise EngineError(f"--ray-address {address}: no Ray cluster could be reached there ({exc.strerror or exc}); "
                          f"start its head with `ray start --head --port {port}` or give the address it printed") from None
    return address


def run_app(
    run_config: dict[str, Any],
    num_supernodes: int,
    workdir: Path,
    cpus_per_client: int = 1,
    app_dir: Path = REPO,
    ray_address: str | None = None,
) -> None:
    """Run the app to completion on `num_supernodes` simulated nodes; stream its log to stdout. `ray_address`:
    the simulation's clients run on that existing Ray cluster (see check_ray_address) instead of a Ray
    started on this machine."""
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    http_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "avrec"\n\n[superlink.avrec]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    overrides = workdir / "run-config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    env = flower_env(home)
    env.pop("RAY_ADDRESS", None)  # the argument alone decides where the clients run
    if ray_address:
        env["RAY_ADDRESS"] = check_ray_address(ray_address)
    log_path = workdir / "superlink.log"
    # Both children run under the reaper: killing us (kill -9 included) stops everything they started.
    superlink = subprocess.Popen(
        reaped([
            flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(http_port),
            "--disable-runtime-dependency-installation", "--log-file", str(log_path),
        ]),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        # A plain SIGTERM would end Python without running `finally`: turn it into an exit that does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        try:
            wait_for_port(http_port, superlink, log_path, "flower-superlink")
        except RuntimeError as exc:
            raise EngineError(str(exc)) from exc
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
        result = subprocess.run(
            reaped([flower_bin("flwr"), "run", str(app_dir), "avrec", "--run-config", str(overrides),
                    "--federation-config", federation, "--stream"]),
            env=env, cwd=app_dir, start_new_session=True,
        )
        if result.returncode != 0:
            raise EngineError(f"`flwr run` exited with {result.returncode}; SuperLink log: {log_path}")
    finally:
        stop_group(superlink)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
