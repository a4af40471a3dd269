"""The full MovieLens-100K comparison: avrec federated under the embedded default (user-level DP, secure
trust model), record-level DP (nothing trusted) and without DP, each next to popularity and the central towers, with wall time, time per round and peak memory. Saves the combined
table to `runs/benchmark-ml100k/table.md` and `table.json`.

    python -m simulations.benchmark_ml100k [--rounds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.config import load_config
from shared.metrics import METRICS, PROTOCOLS
from simulations.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federated run (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-ml100k"))
    parser.add_argument(
        "--configs", default="configs/default.toml,configs/record.toml,configs/no-dp.toml",
        help="run configs, comma-separated"
    )
    args = parser.parse_args()
    rows, runs = [], {}
    for i, path in enumerate(args.configs.split(",")):
        name = Path(path).stem
        overrides = {"out": str((args.out / name).resolve())}
        if args.rounds:
            overrides["num-rounds"] = args.rounds
        summary = simulate(load_config(path, overrides))
        mode = summary["config"]["dp"]
        if mode in ("user", "both"):
            mode += f", trust={summary['config']['trust-model']}"
        runs[mode] = summary
        for name, table in summary["systems"].items():
            if name != "avrec (federated)" and i > 0:
                continue  # baselines do not depend on the run's DP settings: list them once
            label = f"avrec federated, dp={mode}" if name == "avrec (federated)" else name
            rows.append((label, table))
    cols = [(p, m) for p in PROTOCOLS for m in METRICS[p]]
    lines = ["| system | " + " | ".join(f"{p} {m}" for p, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, table in rows:
        lines.append(f"| {label} | " + " | ".join(f"{table[p][m]:.4f}" for p, m in cols) + " |")
    lines.append("")
    for mode, s in runs.items():
        fed = s["federated"]
        priv, user = s["privacy"].get("record_level", {}), s["privacy"].get("user_level", {})
        eps = "; ".join(
            ([f"record-level epsilon median {priv['median']:.2f}, p95 {priv['p95']:.2f}, max {priv['max']:.2f} "
              f"at delta {priv['delta']:g}"] if priv.get("clients") else [])
            + ([f"user-level epsilon {user['epsilon']:.2f} at delta {user['delta']:g}"] if user.get("epsilon") else [])
        ) or "no DP"
        lines.append(
            f"- dp={mode}: {s['clients']} clients, best round {fed['best_round']} of {fed['rounds_run']}, "
            f"{fed['seconds_per_round']:.1f} s per round, wall {s['wall_seconds']:.0f} s, "
            f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB; {eps}"
        )
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
