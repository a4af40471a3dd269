"""Runs the avrec Flower app on Flower's simulation engine, as `flwr run` does, and cleans up after it.

A private SuperLink (simulation mode, loopback, free ports, its own FLWR_HOME) is started as our child
in its own process group, the app is submitted with `flwr run <repo> avrec --stream`, and when the run
ends (or fails, or is interrupted) the whole group is stopped by process id: nothing is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Without this, `flwr run` builds a fresh environment per run and pulls a 5 GB CUDA torch.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class EngineError(RuntimeError):
    """The Flower engine failed; the message names the log to read."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class TreeMemory:
    """Samples the summed resident memory of this process and all its descendants (peak, in bytes)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(interval)


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_rss(pid: int) -> int:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever of it (and its descendants) remains."""
    pids = [process.pid, *descendants(process.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if process.poll() is None:
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if not any(_alive(p) for p in pids):
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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
    # The SuperLink starts its helpers (flower-superexec, flwr-simulation) by name: put ours first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home), "PATH": path}
    log_path = workdir / "superlink.log"
    superlink = subprocess.Popen(
        [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(http_port),
            "--disable-runtime-dependency-installation", "--log-file", str(log_path),
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        # A plain SIGTERM would end Python without running `finally`: turn it into an exit that does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        _wait_for_port(http_port, superlink, log_path)
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
        result = subprocess.run(
            [_bin("flwr"), "run", str(app_dir), "avrec", "--run-config", str(overrides),
             "--federation-config", federation, "--stream"],
            env=env, cwd=app_dir,
        )
        if result.returncode != 0:
            raise EngineError(f"`flwr run` exited with {result.returncode}; SuperLink log: {log_path}")
    finally:
        stop_group(superlink)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineError(f"flower-superlink exited with {process.returncode}; see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise EngineError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log_path}")
