"""The accuracy-diversity trade-off of MMR re-ranking on a finished run: the lists its devices serve,
judged by the harness (`simulations.served_lists`) at each value of the `diversity` knob, with popularity
as a reference point; a table printed and saved, and a plot (matplotlib).

    python -m simulations.diversity_tradeoff RUN_DIR [--knobs 0,0.1,0.2,0.3,0.5,0.7,1] [--out runs/diversity-tradeoff]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from client.serving import DeviceRecommender, run_config
from shared.data.split import leave_one_out
from simulations.served_lists import evaluate


def plot(rows: list[dict], popularity: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric in zip(axes, ("ild@10", "coverage@10", "novelty@10")):
        ax.plot([r[metric] for r in rows], [r["hr@10"] for r in rows], "o-", label="avrec + MMR")
        for r in rows:
            ax.annotate(f"{r['diversity']:g}", (r[metric], r["hr@10"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([popularity[metric]], [popularity["hr@10"]], "s", color="grey", label="popularity")
        ax.set_xlabel(metric)
        ax.set_ylabel("HR@10 (full catalogue)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Accuracy against diversity of the served lists (labels: the diversity knob)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--knobs", default="0,0.1,0.2,0.3,0.5,0.7,1")
    parser.add_argument("--out", type=Path, default=Path("runs/diversity-tradeoff"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = run_config(args.run_dir)
    device = DeviceRecommender.from_run(args.run_dir)
    split = leave_one_out(device.dataset, cfg.seed, cfg.eval_negatives)
    users = split.users[: cfg.max_users] if cfg.max_users else split.users
    rows, popularity = [], {}
    for knob in (float(k) for k in args.knobs.split(",")):
        table, _ = evaluate(device, users, knob, popularity=not popularity)
        popularity = popularity or table["popularity"]
        rows.append({"diversity": knob, **table["avrec"]})
        print(f"diversity {knob:<4g} " + "  ".join(f"{m} {v:.4f}" for m, v in table["avrec"].items()), flush=True)
    print("popularity     " + "  ".join(f"{m} {v:.4f}" for m, v in popularity.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"run_dir": str(args.run_dir.resolve()), "users": len(users), "avrec": rows, "popularity": popularity,
              "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "tradeoff.json").write_text(json.dumps(record, indent=2))
    plot(rows, popularity, args.out / "tradeoff.png")
    print(f"saved {args.out / 'tradeoff.json'} and {args.out / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
