"""Behaviour signals on MovieLens-100K: ratings as the signal against every rating a click.

The same towers trained centrally without DP (`simulations.baselines.central`, not federated) on the same
leave-one-out split, once per variant: every rating a click (signals = none), and ratings as the signal
(signals = rating: 4-5 like, 3 play, 1-2 dislike, weighted by signal-weights; a dislike weighs 0). Test
sampled-99 HR@10 and NDCG@10 at the epoch with the best validation HR@10, over every user and over the users
whose test item they liked (rated 4-5) or did not. The split, the held-out items and the histories are the
same in every variant: only the training examples' weights differ.

    python -m simulations.benchmark_signals [--seeds 0,1,2] [--epochs 15] [--set key=value ...] [--out runs/signals]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shared.cli import _overrides
from shared.config import RunConfig, from_flat
from shared.data.dataset import Dataset, load_dataset
from shared.data.resolve import resolve_dataset
from shared.data.signals import RATING_EVENTS, run_split
from shared.features import EncoderSettings, item_content
from shared.metrics import mean_and_spread
from simulations import baselines

VARIANTS = {
    "every rating a click": {"signals": "none"},
    "ratings as signal (like 1, play 0.5, dislike 0)": {"signals": "rating"},
}
METRICS = ("sampled-99/test/hr@10", "sampled-99/test/ndcg@10")


def liked_test_items(dataset: Dataset, users) -> np.ndarray:
    """Whether each user's test item was liked (its rating maps to like in `RATING_EVENTS`)."""
    rating = dataset.interactions.set_index(["user", "item"])["rating"]
    return np.array([RATING_EVENTS[int(rating.loc[(u.user, u.test)])] == "like" for u in users])


def run(dataset: Dataset, content, base: RunConfig, epochs: int, log=print) -> dict:
    rows = {}
    for name, changes in VARIANTS.items():
        cfg = from_flat(changes, base)
        users = run_split(dataset, cfg).users
        liked = liked_test_items(dataset, users)
        result = baselines.central(users, content, dataset.n_items, cfg, epochs=epochs, per_user=True)
        per_user = result.pop("per_user")
        row = {"best_epoch": result["best_epoch"], "seconds": result["seconds"], "users": len(users),
               "liked users": int(liked.sum())}
        for group, mask in (("all", np.ones(len(users), dtype=bool)), ("liked", liked), ("not liked", ~liked)):
            for metric in METRICS:
                row[f"{group} {metric.split('/')[-1]}"] = float(np.mean([per_user[i][metric] for i in np.flatnonzero(mask)]))
        rows[name] = row
        log(f"{name}: {row}")
    return rows


def format_rows(results: list[dict]) -> str:
    """Markdown: mean over seeds (and +- the standard deviation when there are several)."""
    columns = [f"{g} {m.split('/')[-1]}" for g in ("all", "liked", "not liked") for m in METRICS]
    lines = ["| system (sampled-99, test) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in results[0]:
        cells = []
        for column in columns:
            values = [r[name][column] for r in results]
            cells.append(mean_and_spread(values))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0", help="comma-separated: each its own split and initialisation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/signals"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = from_flat(_overrides(args.set), RunConfig(dp="none"))
    started = time.perf_counter()
    dataset = load_dataset(resolve_dataset(base))
    content = item_content(dataset, base.modality_list, base.cache_dir or None, EncoderSettings.from_config(base))
    results = [run(dataset, content, base.replace(seed=int(seed)), args.epochs) for seed in args.seeds.split(",")]
    text = format_rows(results)
    first = results[0][next(iter(VARIANTS))]
    print(f"\nMovieLens-100K, central training without DP (seeds {args.seeds}, {args.epochs} epochs, modalities "
          f"{base.modalities}): {first['users']} users, {first['liked users']} with a liked (4-5) test item\n{text}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"per_seed": results, "config": base.to_flat(), "epochs": args.epochs,
              "seconds": round(time.perf_counter() - started, 1), "markdown": text}
    (args.out / "signals.json").write_text(json.dumps(record, indent=2))
    print(f"saved {args.out / 'signals.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
