"""Seconds per training round over every MovieLens-100K user: the in-process engine against a plain loop of
the same work, measured in the same run (so the ratio holds on a busy machine), and optionally Flower's
simulation engine.

- plain loop: each device's `Device.train_round` in turn, plus its noise share under trust-model secure (the
  work a round must do, with no engine around it);
- in-process engine: `avrec simulate --engine inprocess` (the server loop, batched devices, the secure sum),
  the second of two rounds (the first also loads content and warms up);
- flower (with --flower): the same two rounds on Flower's simulation engine.
Prints and saves runs/round_time.json. Run: `python -m simulations.benchmark_round [--users N] [--set k=v]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from client.app import population, simulated_device
from shared.config import load_config
from shared.data.resolve import resolve_dataset
from shared.deploy.local import save_report
from shared.features import EncoderSettings, catalogue_shapes, placeholder_content
from shared.model import build_model, shared_state
from shared.secure import noised_share
from simulations.engine import TreeMemory
from simulations.simulate import simulate


def plain_loop(cfg, users: int) -> float:
    """Seconds for one round of every device's own code, one device after another (one thread per core)."""
    torch.set_num_threads(os.cpu_count() or 1)
    n_items, dims = catalogue_shapes(resolve_dataset(cfg), cfg.modality_list, EncoderSettings.from_config(cfg))
    global_state = shared_state(build_model(placeholder_content(n_items, dims), n_items, cfg))
    devices = [simulated_device(cfg, i) for i in range(users)]
    started = time.perf_counter()
    for device in devices:
        reply = device.train_round(global_state, 1)
        if cfg.secure_trust:
            noised_share(reply.delta or {k: torch.zeros_like(v) for k, v in global_state.items()}, cfg, users, 1)
    return time.perf_counter() - started


def engine_round(cfg, engine: str, out: Path) -> tuple[float, int]:
    """The second round's seconds and the peak memory of the whole process tree."""
    with TreeMemory() as memory:
        simulate(cfg.replace(out=str(out), num_rounds=2), log=lambda *_: None, engine=engine, with_baselines=False)
    rounds = [json.loads(line)["seconds"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    return rounds[-1], memory.peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=0, help="first N users (0 = all)")
    parser.add_argument("--flower", action="store_true", help="also time Flower's simulation engine")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = dict(pair.split("=", 1) for pair in args.set)
    with tempfile.TemporaryDirectory(prefix="avrec-round-bench-") as tmp:
        root = Path(tmp)
        cfg = load_config(overrides={**overrides, "max-users": args.users, "state-dir": str(root / "plain-devices")})
        cfg = cfg.replace(dataset=str(resolve_dataset(cfg)))
        users = len(population(cfg)[2])
        report: dict = {"users": users, "cores": os.cpu_count(), "settings": {**overrides, "dp": cfg.dp,
                        "trust-model": cfg.trust_model, "modalities": cfg.modalities, "content-dim": cfg.content_dim}}
        report["plain_loop_seconds"] = round(plain_loop(cfg, users), 2)
        fresh = cfg.replace(state_dir="")
        seconds, peak = engine_round(fresh, "inprocess", root / "inprocess")
        report["inprocess"] = {"round_seconds": seconds, "peak_memory_gib": round(peak / 2**30, 2),
                               "ratio_to_plain_loop": round(seconds / report["plain_loop_seconds"], 3)}
        if args.flower:
            seconds, peak = engine_round(fresh, "flower", root / "flower")
            report["flower"] = {"round_seconds": seconds, "peak_memory_gib": round(peak / 2**30, 2),
                                "ratio_to_plain_loop": round(seconds / report["plain_loop_seconds"], 3)}
    return save_report("round_time", report)


if __name__ == "__main__":
    main()
