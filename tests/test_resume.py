"""Runs that survive: a real `avrec simulate` (Flower's simulation engine, Ray, a tiny planted dataset) killed
with kill -9 of its process group leaves no process behind and resumes from its checkpoint with `--resume`;
an existing run directory is refused without it. The same reaper, on a small tree of real processes, cleans
up when only the parent is killed. A resumed run ends bit for bit equal to an uninterrupted one without DP,
and with DP is charged exactly as it (both on the in-process engine, to keep the suite light)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from server.checkpoint import CHECKPOINT, CheckpointError, saved_config
from shared.config import from_flat, load_config
from shared.data.synthetic import write_planted_dataset
from shared.privacy.verify import verify_run
from shared.processes import alive, descendants, flower_env
from simulations.simulate import simulate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_planted_dataset(root / "planted", n_users=4, n_items=24, n_clusters=2, interactions_per_user=8, seed=0)
    # No DP and a fixed seed: every round is a deterministic function of the last. No private user vector: a
    # kill mid-round may leave some devices' private state a round ahead, which a resumed round would reuse.
    settings = {"dataset": str(data), "cache-dir": str(root / "cache"), "num-rounds": 3, "dp": "none",
                "eval-negatives": 9, "private-user-vector": False, "min-clients": 4}
    return root, settings


def start(root: Path, settings: dict, out: Path) -> subprocess.Popen:
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "simulate", "--out", str(out), *args],
                            cwd=REPO, env=flower_env(), start_new_session=True,
                            stdout=(root / f"{out.name}.log").open("w"), stderr=subprocess.STDOUT)


def wait_until(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def checkpoint_round(out: Path) -> int:
    try:
        with safe_open(str(out / CHECKPOINT), "pt") as handle:
            return json.loads(handle.metadata()["state"])["round"]
    except Exception:  # not written yet
        return 0


def processes_naming(path: Path) -> list[int]:
    """Processes whose command line names `path` (Flower's SuperLink, SuperExec, simulation and Ray
    processes of a run all name its FLWR_HOME or log under it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline and alive(int(entry)):
                found.append(int(entry))
    return found


def assert_nothing_left(tree: list[int], out: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(alive(p) for p in tree) or processes_naming(out)):
        time.sleep(0.5)
    assert not [p for p in tree if alive(p)] and not processes_naming(out), "processes outlived the killed run"


def test_a_parent_killed_alone_takes_the_reaped_tree_with_it(tmp_path):
    """The reaper on a small real tree: a shell whose children fork, and one that leaves its own session
    (as daemons do); only the parent is killed, with kill -9."""
    marker = tmp_path / "tree"
    marker.mkdir()
    tree = f"sh -c 'sleep 300' {marker} & setsid sh -c 'sleep 301' {marker} & (sh -c 'sleep 302' {marker} &) ; wait"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; from shared.processes import reaped; "
         f"subprocess.Popen(reaped(['sh', '-c', {tree!r}]), start_new_session=True); time.sleep(300)"],
        cwd=REPO, start_new_session=True)
    wait_until(lambda: len(processes_naming(marker)) >= 3, "the tree to start", timeout=30)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert_nothing_left([], marker)


def test_a_run_killed_with_kill_9_leaves_nothing_running_and_resumes(setup):
    root, settings = setup
    out = root / "killed"
    proc = start(root, settings, out)
    wait_until(lambda: checkpoint_round(out) >= 1 or proc.poll() is not None, "the first checkpoint")
    tree = descendants(proc.pid)
    assert any(b"ray" in Path(f"/proc/{p}/cmdline").read_bytes() for p in tree if alive(p))
    os.killpg(proc.pid, signal.SIGKILL)  # avrec's whole process group
    proc.wait()
    assert_nothing_left(tree, out)
    interrupted_at = checkpoint_round(out)
    assert 1 <= interrupted_at

    # Without --resume, an existing run directory is refused and left as it was.
    before = (out / "rounds.jsonl").read_text()
    with pytest.raises(CheckpointError, match="already holds a run"):
        simulate(load_config(overrides={**settings, "out": str(out)}), log=lambda *_: None)
    assert (out / "rounds.jsonl").read_text() == before

    # Flower's engine gives the clients new node ids: the run continues under their old names.
    resumed = subprocess.run([sys.executable, "-m", "shared.cli", "simulate", "--resume", str(out)], cwd=REPO,
                             env=flower_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3], f"killed after round {interrupted_at}"
    assert json.loads((out / "summary.json").read_text())["config"]["resume"] is True
    assert verify_run(out).ok, verify_run(out).problems


def test_a_resumed_run_ends_exactly_equal_to_an_uninterrupted_one(setup):
    """Without DP and with a fixed seed: 2 rounds, then resumed for a 3rd, against 3 rounds in one go, bit for
    bit (weights, FedAdam's moments through the checkpoint, every round's metrics). On the in-process engine
    (the same server loop and device code as on Flower's, without its processes), which keeps this light."""
    root, settings = setup
    exact = {**settings, "server-optimizer": "adam", "server-learning-rate": 0.05}
    stopped, whole = root / "exact-resumed", root / "exact-whole"
    quiet = {"log": lambda *_: None, "engine": "inprocess", "with_baselines": False}
    simulate(load_config(overrides={**exact, "num-rounds": 2, "out": str(stopped)}), **quiet)
    simulate(from_flat({**saved_config(stopped), "num-rounds": 3, "resume": True}), **quiet)
    simulate(load_config(overrides={**exact, "out": str(whole)}), **quiet)
    rounds, expected = ([json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()] for d in (stopped, whole))
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [(r["metrics"], r["train_loss"]) for r in rounds] == [(r["metrics"], r["train_loss"]) for r in expected]
    ours, theirs = load_file(stopped / "global_model.safetensors"), load_file(whole / "global_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_dp_run_resumed_ends_with_the_uninterrupted_accounting_and_verifies(setup):
    """With DP (record and user level; noise from the OS CSPRNG, so the models differ) a run stopped after 2
    rounds and resumed for a 3rd is charged exactly as the run of 3: the same ledgers' epsilons, and `avrec
    audit verify` passes. On the in-process engine (the same server loop and device code, no Flower processes),
    which keeps this test light."""
    root, settings = setup
    dp = {**settings, "dp": "both", "trust-model": "central"}
    stopped, whole = root / "dp-resumed", root / "dp-whole"
    quiet = {"log": lambda *_: None, "engine": "inprocess", "with_baselines": False}
    simulate(load_config(overrides={**dp, "num-rounds": 2, "out": str(stopped)}), **quiet)
    resumed = simulate(from_flat({**saved_config(stopped), "num-rounds": 3, "resume": True}), **quiet)
    uninterrupted = simulate(load_config(overrides={**dp, "out": str(whole)}), **quiet)
    assert resumed["federated"]["rounds_run"] == uninterrupted["federated"]["rounds_run"] == 3
    ours, theirs = resumed["privacy"], uninterrupted["privacy"]
    assert ours["user_level"]["epsilon"] == theirs["user_level"]["epsilon"] > 0
    assert {k: ours["record_level"][k] for k in ("median", "max")} == {k: theirs["record_level"][k] for k in ("median", "max")}
    for run in (stopped, whole):
        assert verify_run(run).ok, verify_run(run).problems
