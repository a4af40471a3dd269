"""`python -m shared.reaper -- CMD ...`: run CMD so that nothing it starts outlives the process that started
the reaper.

The reaper runs CMD as its child and is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): every process
orphaned anywhere below it (Flower's SuperExec and simulation processes, Ray's daemons and workers) is
re-parented to it rather than to init, so it still knows the whole tree. When its parent dies, however it
dies (kill -9 of that process alone or of its process group), or when it is asked to stop (SIGTERM, SIGINT,
SIGHUP), or when CMD ends, it stops the whole tree by process id (SIGTERM, then SIGKILL) and exits with CMD's
status. Started in a session of its own (`shared.processes.reaped`), it is not in its parent's process group,
so a kill of that group cannot take it down before it has cleaned up; CMD also gets SIGKILL from the kernel
should the reaper itself be killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from shared.processes import alive, descendants, signal_all

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_SECONDS = 0.2


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to this child when the process that forked it dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_tree(grace: float = 5.0) -> None:
    """SIGTERM every descendant, wait up to `grace` seconds, SIGKILL the rest, and reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = descendants(os.getpid())
        signal_all(pids, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            _reap()
            time.sleep(0.1)
        _reap()
        if not descendants(os.getpid()):
            return


def _reap() -> list[tuple[int, int]]:
    """Collect every child that has exited (adopted orphans included): (pid, wait status) pairs."""
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, status))


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m shared.reaper -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    child = subprocess.Popen(argv[1:], preexec_fn=die_with_parent)
    status = None
    while status is None and not stopping and os.getppid() == parent:
        for pid, raw in _reap():
            if pid == child.pid:
                status = os.waitstatus_to_exitcode(raw)
        time.sleep(POLL_SECONDS)
    stop_tree()
    if status is None:  # the parent died or asked us to stop: CMD was stopped with the rest
        return 128 + (stopping[0] if stopping else signal.SIGKILL)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
