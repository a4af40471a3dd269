"""Runs the avrec Flower app on Flower's simulation engine, as `flwr run` does, and cleans up after it.

A private SuperLink (simulation mode, loopback, free ports, its own FLWR_HOME) is started as our child
in its own process group, the app is submitted with `flwr run <repo> avrec --stream`, and when the run
ends (or fails, or is interrupted) the whole group is stopped by process id: nothing is left running. Both
run under the reaper (shared/reaper.py), so even a kill -9 of this process leaves nothing behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.processes import TreeMemory, descendants, flower_bin, flower_env, free_port, reaped, stop_group, wait_for_port

__all__ = ["EngineError", "TreeMemory", "descendants", "run_app", "toml_value"]

REPO = Path(__file__).resolve().parents[1]


class EngineError(UserError, RuntimeError):
    """The Flower engine failed; the message names the log to read."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def run_app(
    run_config: dict[str, Any],
    num_supernodes: int,
    workdir: Path,
    cpus_per_client: int = 1,
    app_dir: Path = REPO,
) -> None:
    """Run the app to completion on `num_supernodes` simulated nodes; stream its log to stdout."""
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
