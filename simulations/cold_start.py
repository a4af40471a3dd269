"""Cold start: how well items never seen in training are ranked from their content alone.

A seeded random 20% of the items is held out from all training (their interactions are removed from every
user's history). The towers are trained centrally without DP on the rest (the warm catalogue: ID
embeddings and offsets exist only for warm items). Then, for every user who interacted with cold items,
each of those items is ranked against every other cold item (the user's other cold items masked);
HR@10 and NDCG@10 are averaged over a user's cold items, then over users. Ties count against the item.

Compared systems:
- avrec, content only (text, image, text + image): cold items scored by the item tower from content;
- popularity: it has no data on cold items (none of them was ever seen), so all cold items tie and it
  ranks them arbitrarily; with ties counted against the item it scores 0, with random tie-breaking it
  is the random ranking; both are shown;
- random: the exact expectation of a uniformly random ranking;
- oracle popularity (reference only, not a system): cold items ranked by their counts in the very
  interactions being evaluated, which no deployed system could know.

With `--federated` the towers are the global model of a federated run instead (`avrec simulate`'s in-process
engine, the run's privacy settings): the run's dataset is the warm catalogue alone (the cold items' rows and
every interaction with them removed, so no device ever holds them); the cold items then come back appended
to items.csv, are embedded as `avrec embed` embeds them (content only: no ID embedding, no offset) and
ranked by `client.serving.DeviceRecommender`, the code path of `avrec recommend`, from each device's history
and private vector.

    python -m simulations.cold_start [--seeds 0,1,2] [--fraction 0.2] [--set id-embeddings=false] [--out runs/cold-start]
    python -m simulations.cold_start --federated [--set max-users=200 --set num-rounds=5 ...] [--out runs/cold-start-fed]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from shared.cli import _overrides
from shared.config import RunConfig, from_flat
from shared.data.dataset import Dataset, load_dataset
from shared.data.resolve import resolve_dataset
from shared.data.signals import run_split
from shared.data.split import UserSplit, user_negatives
from shared.features import EncoderSettings, ItemContent, item_content
from shared.metrics import hit, mean_and_spread, ndcg, rank_of
from simulations import baselines

VARIANTS = {"avrec content-only: text": ["text"], "avrec content-only: image": ["image"],
            "avrec content-only: text + image": ["text", "image"]}


def cold_items(n_items: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random `fraction` of the item indices, sorted."""
    rng = np.random.default_rng([seed, 20])
    return np.sort(rng.choice(n_items, size=int(round(fraction * n_items)), replace=False))


def warm_first(n_items: int, cold: np.ndarray) -> np.ndarray:
    """The item order with warm items first: position -> original item index."""
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[cold] = True
    return np.concatenate([np.flatnonzero(~is_cold), np.flatnonzero(is_cold)])


def warm_splits(dataset: Dataset, cold: np.ndarray, seed: int, n_negatives: int) -> tuple[list[UserSplit], dict[int, np.ndarray]]:
    """Leave-one-out splits of each user's warm interactions (item indices in warm-first order, negatives
    among warm items) and each user's cold items (indices in warm-first order, all >= the warm count)."""
    order = warm_first(dataset.n_items, cold)
    position = np.empty(dataset.n_items, dtype=np.int64)
    position[order] = np.arange(dataset.n_items)
    n_warm = dataset.n_items - len(cold)
    inter = dataset.interactions
    users, cold_of = [], {}
    for u, group in inter.groupby("user", sort=True):
        seq = position[group["item"].to_numpy()]  # time order (the loader sorts by user, timestamp)
        warm = seq[seq < n_warm]
        if (seq >= n_warm).any():
            cold_of[len(users)] = seq[seq >= n_warm]
        if len(warm) < 3:
            cold_of.pop(len(users), None)
            continue
        val_neg, test_neg = user_negatives(seed, int(u), warm, n_warm, n_negatives)
        users.append(UserSplit(int(u), warm[:-2], int(warm[-2]), int(warm[-1]), val_neg, test_neg))
    return users, cold_of


def cold_metrics(scores: np.ndarray, positives: dict[int, np.ndarray], n_warm: int) -> dict[str, float]:
    """HR@10 and NDCG@10: each user's cold items ranked among all cold items (columns >= n_warm of
    `scores`), the user's other cold items masked; mean over a user's items, then over users."""
    hr, nd = [], []
    for user, items in positives.items():
        cold_scores = np.asarray(scores[user, n_warm:], dtype=np.float64)
        local = np.asarray(items) - n_warm
        h, g = [], []
        for target in local:
            others = np.delete(cold_scores, local)  # every cold item the user did not interact with
            rank = rank_of(cold_scores[target], others)
            h.append(hit(rank, 10))
            g.append(ndcg(rank, 10))
        hr.append(np.mean(h))
        nd.append(np.mean(g))
    return {"hr@10": float(np.mean(hr)), "ndcg@10": float(np.mean(nd)), "users": len(positives),
            "pairs": int(sum(len(v) for v in positives.values()))}


def random_expectation(positives: dict[int, np.ndarray], n_cold: int) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking: the item's rank among the C = n_cold - (its
    user's cold items) + 1 candidates is uniform on 0..C-1."""
    hr, nd = [], []
    for items in positives.values():
        c = n_cold - len(items) + 1
        hr.append(min(10, c) / c)
        nd.append(sum(1.0 / math.log2(r + 2) for r in range(min(10, c))) / c)
    return {"hr@10": float(np.mean(hr)), "ndcg@10": float(np.mean(nd)), "users": len(positives),
            "pairs": int(sum(len(v) for v in positives.values()))}


def oracle_popularity(positives: dict[int, np.ndarray], n_users: int, n_items: int, n_warm: int) -> dict[str, float]:
    counts = np.zeros(n_items)
    for items in positives.values():
        np.add.at(counts, items, 1.0)
    return cold_metrics(np.tile(counts, (n_users, 1)), positives, n_warm)


def permuted(content: ItemContent, order: np.ndarray) -> ItemContent:
    index = torch.as_tensor(order)
    return ItemContent({k: v[index] for k, v in content.features.items()}, content.mask[index],
                       content.computed, content.seconds, content.failures)


def evaluate(dataset: Dataset, contents: dict[str, ItemContent], cfg: RunConfig, fraction: float,
             epochs: int = 15, log=print) -> dict:
    cold = cold_items(dataset.n_items, fraction, cfg.seed)
    n_warm = dataset.n_items - len(cold)
    order = warm_first(dataset.n_items, cold)
    users, positives = warm_splits(dataset, cold, cfg.seed, cfg.eval_negatives)
    rows: dict[str, dict] = {}
    for name, content in contents.items():
        result = baselines.central(users, permuted(content, order), n_warm, cfg, epochs=epochs, keep_scores=True)
        rows[name] = {**cold_metrics(result.pop("scores"), positives, n_warm),
                      "warm test (sampled-99)": result["test"]["sampled-99"], "best_epoch": result["best_epoch"],
                      "modality_weights": result["modality_weights"], "seconds": result["seconds"]}
        log(f"{name}: {rows[name]}")
    ties = np.zeros((len(users), dataset.n_items))
    rows["popularity (all cold items tied, ties against the item)"] = cold_metrics(ties, positives, n_warm)
    rows["popularity (all tied, random tie-breaking) = random"] = random_expectation(positives, len(cold))
    rows["random (exact expectation)"] = random_expectation(positives, len(cold))
    rows["oracle popularity (counts from the evaluated interactions; reference only)"] = oracle_popularity(
        positives, len(users), dataset.n_items, n_warm)
    return {"cold_items": len(cold), "warm_items": n_warm, "users_evaluated": len(positives),
            "training_users": len(users), "fraction": fraction, "seed": cfg.seed, "rows": rows}


def write_catalogues(dataset: Dataset, cold: np.ndarray, out: Path) -> tuple[Path, Path]:
    """Two dataset directories derived from `dataset` (media linked, not copied): `warm`, the catalogue without
    the cold items and only the interactions with warm items (what a federated run trains on), and `grown`, the
    same with the cold items appended to items.csv as new items (what devices hold when the new items arrive;
    item order = `warm_first`)."""
    source = dataset.root
    items = pd.read_csv(source / "items.csv", dtype=str, keep_default_na=False)
    interactions = pd.read_csv(source / "interactions.csv", dtype=str, keep_default_na=False)
    order = warm_first(dataset.n_items, cold)
    n_warm = dataset.n_items - len(cold)
    cold_ids = {dataset.item_ids[i] for i in cold}
    warm_interactions = interactions[~interactions["item_id"].str.strip().isin(cold_ids)]
    dirs = (out / "warm", out / "grown")
    for directory, rows in zip(dirs, (order[:n_warm], order)):
        directory.mkdir(parents=True, exist_ok=False)
        items.iloc[rows].to_csv(directory / "items.csv", index=False)
        warm_interactions.to_csv(directory / "interactions.csv", index=False)
        for key, path in dataset.feature_files().items():
            (directory / "features").mkdir(exist_ok=True)
            np.save(directory / "features" / path.name, dataset.load_features(key)[rows])
        for entry in source.iterdir():  # media folders, linked so that items.csv's relative paths resolve
            if entry.name not in ("items.csv", "interactions.csv", "features"):
                (directory / entry.name).symlink_to(entry.resolve())
    return dirs


def evaluate_federated(dataset: Dataset, cfg: RunConfig, fraction: float, out: Path, log=print) -> dict:
    """Cold items withheld from a federated run's catalogue, then ranked by its global model (see the top)."""
    from client.serving import DeviceRecommender, run_config
    from simulations.simulate import simulate

    if out.exists():
        raise FileExistsError(f"{out}: already holds a measurement; expected a new directory (choose another --out)")
    cold = cold_items(dataset.n_items, fraction, cfg.seed)
    n_warm = dataset.n_items - len(cold)
    users, positives = warm_splits(dataset, cold, cfg.seed, cfg.eval_negatives)
    warm_dir, grown_dir = write_catalogues(dataset, cold, out / "data")
    run_dir = out / "run"
    # drop-short-users: a user whose warm interactions are fewer than 3 cannot be a client (warm_splits skips them)
    summary = simulate(cfg.replace(dataset=str(warm_dir), out=str(run_dir), drop_short_users=True), log=log,
                       engine="inprocess", with_baselines=False)
    if not (run_dir / "global_model.safetensors").is_file():
        raise RuntimeError(f"{run_dir}: the federated run trained no model ({summary['federated']['stop_reason']}); "
                           "expected at least one round: raise the budget or lower the rounds")
    run_cfg = run_config(run_dir)
    grown = load_dataset(grown_dir)
    weights = load_file(run_dir / "global_model.safetensors")
    device = DeviceRecommender(grown, run_cfg, weights, Path(run_cfg.state_dir))
    clients = {grown.user_ids[u.user] for u in run_split(load_dataset(warm_dir), run_cfg).users[: run_cfg.max_users or None]}
    served = {p: items for p, items in positives.items() if dataset.user_ids[users[p].user] in clients}
    scores = np.zeros((len(users), grown.n_items))
    for p in served:
        view = device.user(dataset.user_ids[users[p].user])  # the device's whole history and private vector
        scores[p] = device.recommender.scores(view.history, view.private).numpy()
    federated = summary["systems"]["avrec (federated)"]
    rows = {
        "avrec federated, new items from content": cold_metrics(scores, served, n_warm),
        "popularity (all cold items tied, ties against the item)": cold_metrics(np.zeros_like(scores), served, n_warm),
        "random (exact expectation) = popularity with random tie-breaking": random_expectation(served, len(cold)),
        "oracle popularity (counts from the evaluated interactions; reference only)": oracle_popularity(
            served, len(users), dataset.n_items, n_warm),
    }
    for name, row in rows.items():
        log(f"{name}: {row}")
    return {"cold_items": len(cold), "warm_items": n_warm, "users_evaluated": len(served), "clients": len(clients),
            "fraction": fraction, "seed": cfg.seed, "rows": rows, "model_catalogue": device.recommender.model.items.n_catalogue,
            "warm test (sampled-99)": federated.get("sampled-99"), "privacy": summary["privacy"], "run": str(run_dir)}


def format_rows(results: list[dict]) -> str:
    """Markdown: mean over seeds (and +- the standard deviation when there are several)."""
    lines = ["| system | HR@10 | NDCG@10 |", "|---|---|---|"]
    for name in results[0]["rows"]:
        cells = []
        for metric in ("hr@10", "ndcg@10"):
            values = [r["rows"][name][metric] for r in results]
            cells.append(mean_and_spread(values))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0", help="comma-separated: each draws its own cold items")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--federated", action="store_true",
                        help="rank with a federated run's global model (the run's own settings, default user-level DP)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/cold-start (runs/cold-start-fed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs/cold-start-fed" if args.federated else "runs/cold-start")
    cfg = from_flat(_overrides(args.set), RunConfig() if args.federated else RunConfig(dp="none"))
    started = time.perf_counter()
    dataset = load_dataset(resolve_dataset(cfg))
    if args.federated:
        try:
            results = [evaluate_federated(dataset, cfg.replace(seed=int(seed)), args.fraction, out / f"seed-{seed}")
                       for seed in args.seeds.split(",")]
        except (FileExistsError, RuntimeError) as exc:
            print(f"cold_start: error: {exc}", file=sys.stderr)
            return 1
        epsilons = [r["privacy"].get("user_level", {}).get("epsilon") for r in results]
        return _report(results, cfg, args, out, started,
                       f"MovieLens-100K new items with the federated model: {results[0]['cold_items']} of "
                       f"{dataset.n_items} items withheld from the run's catalogue (seeds {args.seeds}, "
                       f"{results[0]['clients']} clients, dp={cfg.dp}, user-level epsilon {epsilons}, "
                       f"{cfg.num_rounds} rounds, modalities {cfg.modalities}); {results[0]['users_evaluated']} "
                       "clients ranked each new item against the other new items")
    settings = EncoderSettings.from_config(cfg)
    contents = {name: item_content(dataset, m, cfg.cache_dir or None, settings) for name, m in VARIANTS.items()}
    results = [evaluate(dataset, contents, cfg.replace(seed=int(seed)), args.fraction, args.epochs)
               for seed in args.seeds.split(",")]
    first = results[0]
    return _report(results, cfg, args, out, started,
                   f"MovieLens-100K cold start: {first['cold_items']} of {dataset.n_items} items held out from all "
                   f"training (seeds {args.seeds}, id-embeddings={cfg.id_embeddings}); {first['users_evaluated']} "
                   "users, each cold item ranked against the other cold items")


def _report(results: list[dict], cfg: RunConfig, args: argparse.Namespace, out: Path, started: float, title: str) -> int:
    text = format_rows(results)
    print(f"\n{title}:\n{text}")
    out.mkdir(parents=True, exist_ok=True)
    record = {"per_seed": results, "config": cfg.to_flat(), "epochs": args.epochs,
              "seconds": round(time.perf_counter() - started, 1), "markdown": text}
    (out / "cold-start.json").write_text(json.dumps(record, indent=2))
    print(f"saved {out / 'cold-start.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
