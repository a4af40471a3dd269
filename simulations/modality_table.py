"""What each content modality buys on MovieLens-100K: the foundation's quality table for text only, image
only (the posters), text plus image, and ID only, with the same towers trained centrally without DP
(`simulations.baselines.central`: the same split, protocols and epoch selection as `avrec simulate`).

    python -m simulations.modality_table [--seeds 0,1,2] [--set id-embeddings=false] [--out runs/modality-table]

Central training, not federated: a full federated run takes about 11 minutes per row on this 2-core
machine. ID only has no content modality: its item vectors are the learned ID embeddings alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from shared.cli import _overrides
from shared.config import RunConfig, from_flat
from shared.data.dataset import load_dataset
from shared.data.resolve import resolve_dataset
from shared.data.split import leave_one_out
from shared.features import EncoderSettings, ItemContent, item_content
from shared.metrics import METRICS, PROTOCOLS, mean_and_spread
from simulations import baselines

VARIANTS = {"text only": ["text"], "image only": ["image"], "text + image": ["text", "image"], "ID only": []}


def id_only_content(n_items: int) -> ItemContent:
    """No content at all: one zero-width-in-effect modality that every item lacks (mask 0), so the item
    vector is the ID embedding alone and the user tower's history summary is zero."""
    return ItemContent({"none": torch.zeros(n_items, 1)}, torch.zeros(n_items, 1), 0, 0.0)


def content_for(dataset, modalities: list[str], cfg: RunConfig) -> ItemContent:
    if not modalities:
        return id_only_content(dataset.n_items)
    return item_content(dataset, modalities, cfg.cache_dir or None, EncoderSettings.from_config(cfg))


def format_rows(rows: dict[str, dict]) -> str:
    """Markdown: mean over seeds (and +- the standard deviation when there are several)."""
    cols = [(p, m) for p in PROTOCOLS for m in METRICS[p]]
    lines = ["| system | " + " | ".join(f"{p} {m}" for p, m in cols) + " | best epoch | learned modality weights |",
             "|---" * (len(cols) + 3) + "|"]
    for name, runs in rows.items():
        def cell(p, m):
            values = [r["test"][p][m] for r in runs]
            return mean_and_spread(values)

        weights = {k: np.mean([r["modality_weights"][k] for r in runs]) for k in runs[0].get("modality_weights", {})}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in weights.items() if k != "none") or "-"
        epochs = ", ".join(str(r.get("best_epoch", "-")) for r in runs)
        lines.append(f"| {name} | " + " | ".join(cell(p, m) for p, m in cols) + f" | {epochs} | {shown} |")
    return "\n".join(lines)


def table_for_seed(cfg: RunConfig, epochs: int, log=print) -> dict[str, dict]:
    dataset = load_dataset(resolve_dataset(cfg))
    split = leave_one_out(dataset, cfg.seed, cfg.eval_negatives, drop_short_users=cfg.drop_short_users)
    rows: dict[str, dict] = {"popularity": baselines.popularity(split.users, dataset.n_items)}
    for name, modalities in VARIANTS.items():
        run_cfg = cfg.replace(modalities=",".join(modalities) or "none")
        if not modalities:
            run_cfg = run_cfg.replace(id_embeddings="true")  # ID only: nothing else to rank with
        content = content_for(dataset, modalities, cfg)
        result = baselines.central(split.users, content, dataset.n_items, run_cfg, epochs=epochs)
        result["content"] = {k: list(v.shape) for k, v in content.features.items()}
        result["items_with_modality"] = {k: int(n) for k, n in zip(content.features, content.mask.sum(0).tolist())}
        result["media_failures"] = content.failures.get("failed", {})
        rows[name] = result
        log(f"seed {cfg.seed}, {name}: {result['test']} (best epoch {result['best_epoch']}, {result['seconds']} s)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0", help="comma-separated: split, negatives and initialisation seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/modality-table"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = from_flat(_overrides(args.set), RunConfig(dp="none"))
    if cfg.dp != "none":
        parser.error("central training is without DP: leave dp at none")
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {seed: table_for_seed(cfg.replace(seed=seed), args.epochs, lambda m: print(m, flush=True)) for seed in seeds}
    rows = {name: [per_seed[seed][name] for seed in seeds] for name in per_seed[seeds[0]]}
    text = format_rows(rows)
    print(f"\nMovieLens-100K, central training without DP (id-embeddings={cfg.id_embeddings}, {args.epochs} epochs, "
          f"seeds {args.seeds}, test at the epoch with the best validation HR@10):\n{text}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"per_seed": per_seed, "seeds": seeds, "config": cfg.to_flat(), "epochs": args.epochs,
              "seconds": round(time.perf_counter() - started, 1), "markdown": text}
    (args.out / "modality-table.json").write_text(json.dumps(record, indent=2))
    print(f"saved {args.out / 'modality-table.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
