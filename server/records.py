"""What the server writes to the run directory: one line per round, the global model every round, and the
federated result (test metrics at the round with the best validation HR@10)."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shared.config import RunConfig
from shared.errors import UserError
from shared.metrics import mean_metrics, table

SELECT_BY = "sampled-99/val/hr@10"


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunFailed(UserError, RuntimeError):
    """The run trained nothing it could use (`failure`): it must not end as a success."""


def reason_counts(problems: list[str]) -> dict[str, int]:
    """How often each reason occurred, node ids left out ("node 123: no reply" -> "node N: no reply")."""
    return dict(Counter(re.sub(r"node -?\d+", "node N", p) for p in problems))


def failure(rounds: list[dict[str, Any]]) -> str:
    """Why the run failed, or "": no update was aggregated although clients failed or were rejected, or most
    client-rounds failed. Devices declining at the end of their budget are a designed end, not a failure."""
    sampled = sum(r["clients_sampled"] for r in rounds)
    failed = sum(r["clients_failed"] + r["updates_rejected"] for r in rounds)
    if not failed or (any(r["clients_aggregated"] for r in rounds) and 2 * failed <= sampled):
        return ""
    counts: Counter = Counter()
    for r in rounds:
        counts.update(r.get("problem_counts", {}))
    reasons = "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(3))
    what = ("no update was aggregated in any round" if not any(r["clients_aggregated"] for r in rounds)
            else "most clients failed")
    return f"{what}: {failed} of {sampled} client-rounds failed or were rejected over {len(rounds)} round(s) ({reasons})"


class RunRecorder:
    def __init__(self, out: Path, rounds: list[dict[str, Any]] | None = None) -> None:
        """`rounds`: the rows of a resumed run's checkpoint; rounds.jsonl is rewritten to exactly them (a row
        written after the last checkpoint is dropped: its round runs again, or is skipped if the server's
        ledger already charged it)."""
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = list(rounds or [])
        self.stop_reason = ""
        text = "".join(json.dumps(row) + "\n" for row in self.rounds)
        atomic_write(out / "rounds.jsonl", lambda p: Path(p).write_text(text))

    def round(self, server_round: int, metric_rows: list[dict[str, float]], seconds: float, **facts: Any) -> None:
        quality = mean_metrics({k: v for k, v in r.items() if "/" in k} for r in metric_rows if SELECT_BY in r)
        losses = [r["train-loss"] for r in metric_rows if "train-loss" in r]
        row = {
            "round": server_round,
            "seconds": round(seconds, 3),
            "clients_sampled": facts["sampled"],
            "clients_aggregated": facts["aggregated"],
            "clients_declined": len(facts["declined"]),
            "updates_rejected": len(facts["rejected"]),
            "clients_failed": len(facts["failed"]),
            "train_loss": math.fsum(losses) / len(losses) if losses else None,  # exact: independent of reply order
            "user_epsilon": facts["user_epsilon"],
            "metrics": quality,
            "problems": (facts["declined"] + facts["rejected"] + facts["failed"])[:20],
            "problem_counts": reason_counts(facts["rejected"] + facts["failed"]),
            "ray_nodes": facts.get("ray_nodes", {}),  # devices per Ray node (Flower's engine; {} in process)
        }
        self.rounds.append(row)
        with open(self.out / "rounds.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def checkpoint(self, state: dict[str, torch.Tensor], evaluated: dict[str, torch.Tensor]) -> None:
        """`state`: the weights after the last round; `evaluated`: the weights that round's devices received and
        ranked with, which its metrics describe (kept as the best model when the round is the best)."""
        meta = {"round": str(self.rounds[-1]["round"] if self.rounds else 0)}
        for name, weights in (("global_model", state), ("best_model", evaluated)):
            if name == "global_model" or self.best() is self.rounds[-1]:
                tensors = {k: v.contiguous() for k, v in weights.items()}
                atomic_write(self.out / f"{name}.safetensors", lambda p: save_file(tensors, p, metadata=meta))

    def stopped(self, reason: str) -> None:
        self.stop_reason = reason

    def best(self) -> dict[str, Any] | None:
        scored = [r for r in self.rounds if SELECT_BY in r["metrics"]]
        return max(scored, key=lambda r: r["metrics"][SELECT_BY]) if scored else None

    def progress_line(self) -> str:
        r = self.rounds[-1]
        m = r["metrics"]
        val = m.get(SELECT_BY, float("nan"))
        test = m.get("sampled-99/test/hr@10", float("nan"))
        loss = r["train_loss"] if r["train_loss"] is not None else float("nan")
        eps = f" user-eps {r['user_epsilon']:.2f}" if r["user_epsilon"] is not None else ""
        return (
            f"round {r['round']:>3}  {r['seconds']:6.1f}s  clients {r['clients_aggregated']}/{r['clients_sampled']}"
            f"  loss {loss:.4f}  val HR@10 {val:.4f}  test HR@10 {test:.4f}{eps}"
        )

    def finish(self, cfg: RunConfig) -> dict[str, Any]:
        best = self.best()
        result = {
            "best_round": best["round"] if best else None,
            "selected_by": SELECT_BY,
            "test": table(best["metrics"], "test") if best else {},
            "val": table(best["metrics"], "val") if best else {},
            "rounds_run": len(self.rounds),
            "seconds_per_round": (sum(r["seconds"] for r in self.rounds) / len(self.rounds)) if self.rounds else None,
            "user_epsilon": self.rounds[-1]["user_epsilon"] if self.rounds else None,
            "clients_declined_total": sum(r["clients_declined"] for r in self.rounds),
            "updates_rejected_total": sum(r["updates_rejected"] for r in self.rounds),
            "clients_failed_total": sum(r["clients_failed"] for r in self.rounds),
            "stop_reason": self.stop_reason,
            "failure": failure(self.rounds),
            "config": cfg.to_flat(),
        }
        atomic_write(self.out / "federated.json", lambda p: Path(p).write_text(json.dumps(result, indent=2)))
        return result
