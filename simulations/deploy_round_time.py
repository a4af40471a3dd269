"""Round time of a secured loopback deployment against the same round in simulation.

The same six MovieLens-100K users and settings (record-level DP, 2 rounds): deployed as three
SuperNodes of two users each behind a TLS SuperLink with node authentication (real processes on
127.0.0.1, as tests/test_deploy.py), and simulated as six clients on Flower's simulation engine.
Prints and saves runs/deploy_round_time.json. Run: `python -m simulations.deploy_round_time`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from shared.config import load_config
from shared.deploy.local import run_on_loopback, save_report
from simulations.simulate import simulate

REPO = Path(__file__).resolve().parents[1]
RUN = {"num-rounds": 2, "dp": "record", "modalities": "text"}
DEVICES, USERS_PER_DEVICE = 3, 2


def rounds(out: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (out / "rounds.jsonl").read_text().splitlines()]


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="avrec-deploy-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        run_on_loopback(root, REPO, DEVICES, USERS_PER_DEVICE, RUN)
        deployed_wall = time.perf_counter() - started
        deployed = rounds(root / "run")
        cfg = load_config(overrides={**RUN, "max-users": DEVICES * USERS_PER_DEVICE, "out": str(root / "simulated"),
                                     "min-clients": DEVICES * USERS_PER_DEVICE})
        started = time.perf_counter()
        simulate(cfg, log=lambda *_: None)
        simulated_wall = time.perf_counter() - started
        simulated = rounds(root / "simulated")
    report = {
        "users": DEVICES * USERS_PER_DEVICE,
        "deployment": {"supernodes": DEVICES, "round_seconds": deployed, "wall_seconds_including_setup": round(deployed_wall, 1),
                       "security": "TLS (own CA), SuperNode authentication (EC P-384 keys)"},
        "simulation": {"clients": DEVICES * USERS_PER_DEVICE, "round_seconds": simulated,
                       "wall_seconds_including_baselines": round(simulated_wall, 1)},
        "settings": RUN,
    }
    return save_report("deploy_round_time", report)


if __name__ == "__main__":
    main()
