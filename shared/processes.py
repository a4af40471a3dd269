"""Child processes on this machine: free loopback ports, Flower's environment, waiting for a listener,
and stopping a whole process tree by process id (never by name). Used by the simulation runner and by
deployments started from Python (tests, `avrec deploy`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Without this, `flwr run` builds a fresh environment per run and pulls a 5 GB CUDA torch.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def reaped(command: list[str]) -> list[str]:
    """`command` run under the reaper (shared/reaper.py): none of its processes outlives our process, however
    ours ends. Start the result with start_new_session=True. The reaper finds this package through its own
    sys.path only, so the command's environment (and what Flower imports) is unchanged."""
    root = str(Path(__file__).resolve().parents[1])
    bootstrap = f"import sys; sys.path.insert(0, {root!r}); from shared.reaper import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", bootstrap, "--", *command]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True while something listens on host:port."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment when there is one, else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """This environment plus Flower's quiet settings; our interpreter's bin first on PATH (a SuperLink
    or SuperNode starts its helpers, flower-superexec, flwr-serverapp, flwr-clientapp, by name)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **QUIET_ENV, "PATH": path}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def wait_for_port(port: int, process: subprocess.Popen, log_path: Path, what: str, timeout: float = 60.0) -> None:
    """Wait until `process` listens on 127.0.0.1:port; raise naming its log when it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {log_path}")
        if port_in_use(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log_path}")


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
    """SIGTERM the process group, wait, then SIGKILL whatever of it (and its descendants) remains.
    `process` must have been started with start_new_session=True (its pid is its group id)."""
    pids = [process.pid, *descendants(process.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        signal_all(pids, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        if process.poll() is None:
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if not any(alive(p) for p in pids):
            return


def signal_all(pids: list[int], sig: int) -> None:
    """Send `sig` to each process that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
