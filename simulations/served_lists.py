"""The lists the devices serve after a run, judged by the simulation's harness: accuracy and diversity.

For every client of the run, its device's serving path (`client.serving`: the run's last global model, the
device's private vector, its history with the validation item as the latest item, everything it consumed
excluded, MMR re-ranking at the run's `diversity`) gives a top-k list over the whole catalogue; the
harness, which alone knows the held-out test item, scores it: HR@k and NDCG@k (full catalogue), and the
list's intra-list distance and novelty; over all lists, catalogue coverage. Popularity (the most
interacted-with training items the user has not consumed) is judged the same way.

Per-user results go to `RUN_DIR/per-user.jsonl` for `avrec compare`. They are the harness's: under DP
a deployed device never sends them (they depend on its records); a deployment reports only aggregates
the privacy ledger accounts for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from client.serving import DeviceRecommender
from shared.config import RunConfig
from shared.data.dataset import Dataset
from shared.data.split import UserSplit
from shared.diversity import coverage, intra_list_distance, novelty, self_information

PER_USER = "per-user.jsonl"


def list_metrics(items: Sequence[int], test: int, content, information: np.ndarray) -> dict[str, float]:
    k = len(items)
    rank = list(items).index(test) if test in items else None
    return {f"hr@{k}": float(rank is not None), f"ndcg@{k}": 0.0 if rank is None else 1.0 / math.log2(rank + 2),
            f"ild@{k}": intra_list_distance(items, content), f"novelty@{k}": novelty(items, information)}


def evaluate(device: DeviceRecommender, users: Sequence[UserSplit], diversity: float, k: int = 10,
             popularity: bool = True) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Aggregate metrics per system and per-user rows for the run's users."""
    dataset = device.dataset
    counts = np.zeros(dataset.n_items)
    for u in users:
        counts[u.train] += 1  # popularity from training interactions only
    information = self_information(counts, len(users))
    content = device.recommender.content
    by_popularity = np.argsort(-counts, kind="stable")
    lists: dict[str, list[list[int]]] = {"avrec": [], **({"popularity": []} if popularity else {})}
    rows = []
    for u in users:
        user = device.user(dataset.user_ids[u.user])
        history = np.append(u.train, u.val)  # by test time the validation item is the latest one
        served = {"avrec": device.recommender.rank(history, user.private, k, diversity=diversity)}
        if popularity:
            seen = set(history.tolist())
            served["popularity"] = [int(i) for i in by_popularity if i not in seen][:k]
        for system, items in served.items():
            lists[system].append(items)
            rows.append({"user": user.user_id, "system": system, **list_metrics(items, u.test, content, information)})
    table = {}
    for system, system_lists in lists.items():
        mine = [r for r in rows if r["system"] == system]
        table[system] = {m: float(np.mean([r[m] for r in mine])) for m in mine[0] if m not in ("user", "system")}
        table[system][f"coverage@{k}"] = coverage(system_lists, dataset.n_items)
    return table, rows


def served_lists(out: Path, cfg: RunConfig, dataset: Dataset, users: Sequence[UserSplit], k: int = 10) -> dict[str, Any]:
    """`evaluate` on a finished run's directory; writes the per-user rows and returns the summary entry."""
    state_root = Path(cfg.state_dir) if cfg.state_dir else out / "devices"
    device = DeviceRecommender(dataset, cfg, load_file(out / "global_model.safetensors"), state_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one user's small products: two threads were 8x slower on 2 shared cores
    try:
        table, rows = evaluate(device, users, cfg.diversity, k)
    finally:
        torch.set_num_threads(threads)
    with open(out / PER_USER, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    return {"model": "last round's global weights with each device's private vector", "k": k,
            "diversity": cfg.diversity, "protocol": "full catalogue, validation item in the history",
            "systems": table, "per_user": PER_USER}


def table_lines(entry: dict[str, Any]) -> list[str]:
    """The served lists' rows for `avrec simulate`'s printed table."""
    metrics = list(next(iter(entry["systems"].values())))
    head = f"{'served lists':<20}" + "".join(f"{m:>16}" for m in metrics)
    lines = ["", f"lists the devices serve (diversity {entry['diversity']}, {entry['protocol']}; harness only):", head]
    lines += [f"{name:<20}" + "".join(f"{row[m]:>16.4f}" for m in metrics) for name, row in entry["systems"].items()]
    return lines
