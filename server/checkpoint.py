"""The server's resumable state: one file, `checkpoint.safetensors` in the run directory, replaced atomically
after every round (a crash mid-write leaves the previous round's).

It holds what the next round needs to continue exactly where the last one ended: the global weights, the
server optimizer's moments, the round counter, the rounds recorded so far (and so the best round), the
sampling state (how often and when each client was chosen) and the devices' last signed ledger heads, and
the run's id, which devices write into their ledgers so that a device's rounds are ordered within a run
while its ledger (and budget) spans every run it took part in. The server's user-level ledger is its own
append-only file beside it and is reopened as it is.

A fresh run refuses a directory that already holds a run's records; `resume = true` continues one.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from server.aggregate import ServerOptimizer
from server.records import atomic_write
from shared.config import RunConfig
from shared.errors import UserError
from shared.privacy.ledger import PrivacyLedger

CHECKPOINT = "checkpoint.safetensors"
# Files whose presence means the directory holds a run (written by the server from round 1 on)
RUN_RECORDS = (CHECKPOINT, "rounds.jsonl", "federated.json", "server-ledger.jsonl")
# Settings a resumed run may change: how many rounds it runs in all, that it resumes, and how often it
# reports progress (a terminal or not)
RESUMABLE_CHANGES = ("num-rounds", "resume", "progress-seconds")
_MOMENTS = ("m", "v")


class CheckpointError(UserError, RuntimeError):
    """A run directory cannot be started or resumed as asked."""


@dataclass
class RunState:
    run_id: str
    round: int = 0  # the last round completed
    rounds: list[dict[str, Any]] = field(default_factory=list)  # rounds.jsonl's rows so far
    chosen: dict[str, int] = field(default_factory=dict)  # rounds each client was sent (the schedule's cap)
    last_round: dict[str, int] = field(default_factory=dict)  # the last round each client was sent
    device_heads: dict[str, dict] = field(default_factory=dict)
    clients: list[int] = field(default_factory=list)  # the client names of the last round's nodes
    config: dict[str, Any] = field(default_factory=dict)


def existing_records(out: Path) -> list[str]:
    return [name for name in RUN_RECORDS if (out / name).exists()]


def refuse_existing(out: Path) -> None:
    """A fresh run never overwrites another run's records."""
    found = existing_records(out)
    if found:
        raise CheckpointError(
            f"run directory {out} already holds a run ({', '.join(found)}): resume it with `avrec simulate "
            "--resume` (resume = true), or choose a new --out")


def begin(out: Path, cfg: RunConfig, optimizer: ServerOptimizer, initial: Callable[[], dict[str, torch.Tensor]]
          ) -> tuple[RunState, dict[str, torch.Tensor]]:
    """A fresh run (refusing a directory that holds one) or, with `resume`, the checkpoint's state and weights,
    the optimizer's moments restored into `optimizer`."""
    if not cfg.resume:
        refuse_existing(out)
        return RunState(run_id=secrets.token_hex(8), config=cfg.to_flat()), initial()
    state, weights, moments = load(out, cfg)
    optimizer.m, optimizer.v = moments["m"], moments["v"]
    return state, weights


def client_names(state: RunState, nodes: list[int], fraction_train: float) -> dict[int, int]:
    """The name each connected node carries in the ledger's participant lists and the sampling state: its own
    id, except in a resumed simulation, whose engine gives the same clients new random node ids. There every
    new node takes an old client's name, which is sound only where the old clients are interchangeable:
    each charged for the same rounds (or every round amplified, fraction-train < 1, which charges everyone
    alike). Otherwise a user could escape its own history under a new id, so the resume is refused."""
    old = [int(c) for c in state.clients]
    if not old or set(nodes) == set(old) or not set(nodes).isdisjoint(old):
        return {n: n for n in nodes}
    same = (len({state.chosen.get(str(c), 0) for c in old}) <= 1 and len({state.last_round.get(str(c)) for c in old}) <= 1)
    if len(nodes) != len(old) or not (same or fraction_train < 1.0):
        raise CheckpointError(
            f"resume: the {len(nodes)} connected nodes are not the run's {len(old)} clients (new node ids), and "
            "its clients were chosen for different rounds, so the ledger could not tell which new node carries "
            "which history; the run cannot continue without under-counting someone's privacy loss")
    return dict(zip(sorted(nodes), sorted(old)))


def first_round(state: RunState, ledger: PrivacyLedger | None) -> int:
    """The next round: after the checkpoint's, and after any round the server's ledger already charged (a crash
    between the ledger entry and the checkpoint): a round number is never charged twice."""
    charged = ledger.entries[-1].round if ledger is not None and ledger.entries else 0
    return max(state.round, charged) + 1


def save(out: Path, state: RunState, weights: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]]) -> None:
    """Replace the checkpoint with this round's (weights, optimizer moments and `state`) in one atomic write."""
    tensors = {f"weights/{k}": v.contiguous() for k, v in weights.items()}
    for kind in _MOMENTS:
        tensors.update({f"optimizer-{kind}/{k}": v.contiguous() for k, v in moments.get(kind, {}).items()})
    meta = {"state": json.dumps(asdict(state))}
    atomic_write(out / CHECKPOINT, lambda p: save_file(tensors, p, metadata=meta))


def load(out: Path, cfg: RunConfig) -> tuple[RunState, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The checkpoint of the run in `out`, checked against `cfg` (only RESUMABLE_CHANGES may differ)."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"resume: {path} does not exist: the run in {out} never completed a round (start it afresh with a "
            "new --out)" if out.is_dir() else f"resume: run directory {out} does not exist")
    try:
        with safe_open(str(path), "pt") as handle:
            state = RunState(**json.loads((handle.metadata() or {})["state"]))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"resume: {path} is unreadable ({type(exc).__name__}: {exc}); the run cannot continue "
                              "from it") from None
    changed = sorted(k for k, v in cfg.to_flat().items()
                     if k not in RESUMABLE_CHANGES and state.config.get(k) != v)
    if changed:
        shown = "; ".join(f"{k} = {cfg.to_flat()[k]!r}, the run has {state.config.get(k)!r}" for k in changed[:4])
        raise CheckpointError(f"resume: settings differ from the run being resumed ({shown}): only "
                              f"{', '.join(RESUMABLE_CHANGES)} may change")
    weights = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("weights/")}
    moments = {kind: {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optimizer-{kind}/")}
               for kind in _MOMENTS}
    state.config = cfg.to_flat()
    return state, weights, moments


def saved_config(out: Path) -> dict[str, Any]:
    """The configuration a run directory's checkpoint was written under (for `avrec simulate --resume`)."""
    path = out / CHECKPOINT
    try:
        with safe_open(str(path), "pt") as handle:
            return dict(json.loads((handle.metadata() or {})["state"])["config"])
    except FileNotFoundError:
        raise CheckpointError(f"resume: {path} does not exist: the run in {out} never completed a round, or "
                              f"{out} is not a run directory") from None
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"resume: {path} is unreadable ({type(exc).__name__}: {exc})") from None

