"""New users: recommendations from interest tags a user picks (no history) and from their first 1, 3
and 5 events, against popularity, on users the run never trained on.

A run with `max-users = N` trains on the first N users; every later user of the dataset is new to it:
their device holds no private vector and none of their data reached the model. Each new user's device
serves (`client.serving`: the run's last global model, no saved private vector; with the run's
`private-fit-steps` one fitted on the device to the events it was given) from:
- 0 events, no tags: the learned item offsets alone;
- 0 events, picked tags: the same plus `tag_boost` for each picked tag an item carries. The picks are a
  stand-in for what the user would tick on an onboarding screen: the 3 strongest interest tags of their
  first 5 events (those events are not used as history);
- their first 1, 3 or 5 events as history.
Every list excludes the events it was given and is judged on the same targets, everything the user
consumed after their 5th event: precision@10 and recall@20. Popularity ranks by the training users'
interaction counts.

    python -m simulations.new_users RUN_DIR [--users 300] [--out runs/new-users]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from client.serving import DeviceRecommender, run_config
from shared.data.split import leave_one_out
from shared.serving.tags import Interests, TagEdits, derive_interests

EVENTS = (0, 1, 3, 5)
PICKS = 3


def _judge(items: list[int], later: set[int]) -> dict[str, float]:
    return {"precision@10": len(set(items[:10]) & later) / 10, "recall@20": len(set(items[:20]) & later) / len(later)}


def evaluate(device: DeviceRecommender, clients: int, n_users: int, tag_boost: float = 1.0) -> dict[str, dict[str, float]]:
    ds = device.dataset
    counts = np.bincount(ds.interactions.loc[ds.interactions["user"] < clients, "item"], minlength=ds.n_items)
    by_popularity = np.argsort(-counts, kind="stable")
    rec = device.recommender
    rows: dict[str, list[dict[str, float]]] = {}
    for index in range(clients, min(ds.n_users, clients + n_users)):
        events = ds.interactions.loc[ds.interactions["user"] == index, "item"].to_numpy(np.int64)
        later = set(events[5:].tolist())
        picks = list(derive_interests(events[:5], np.ones(5), device.catalogue.tags, top=PICKS))
        lists = {"avrec, 0 events, no tags": rec.rank(events[:0], None, 20)}
        tags = Interests({}, TagEdits(added=picks))
        lists[f"avrec, 0 events, {PICKS} picked tags"] = [r.item for r in rec.recommend(events[:0], None, 20, tags, tag_boost, explain=0)]
        for k in EVENTS:
            if k:
                lists[f"avrec, first {k} events"] = rec.rank(events[:k], device.fitted_private(events[:k]), 20)
            seen = set(events[:k].tolist())
            lists[f"popularity, first {k} events"] = [int(i) for i in by_popularity[: 20 + k] if i not in seen][:20]
        for name, items in lists.items():
            rows.setdefault(name, []).append(_judge(items, later))
    return {name: {m: float(np.mean([r[m] for r in rs])) for m in rs[0]} | {"users": len(rs)} for name, rs in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run of `avrec simulate` with max-users below the dataset's users")
    parser.add_argument("--users", type=int, default=300, help="new users judged (the first after the run's clients)")
    parser.add_argument("--tag-boost", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("runs/new-users"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = run_config(args.run_dir)
    device = DeviceRecommender.from_run(args.run_dir)
    clients = len(leave_one_out(device.dataset, cfg.seed, cfg.eval_negatives).users[: cfg.max_users or None])
    if not cfg.max_users or clients >= device.dataset.n_users:
        raise SystemExit(f"{args.run_dir}: every user of the dataset trained in this run (max-users = {cfg.max_users}); "
                         "new users need a run with --set max-users=N below the dataset's users")
    table = evaluate(device, clients, args.users, args.tag_boost)
    print(f"{'system':<36}{'precision@10':>14}{'recall@20':>12}")
    for name, row in table.items():
        print(f"{name:<36}{row['precision@10']:>14.4f}{row['recall@20']:>12.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"run_dir": str(args.run_dir.resolve()), "clients": clients, "tag_boost": args.tag_boost,
              "targets": "every event after the user's 5th", "systems": table,
              "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "new-users.json").write_text(json.dumps(record, indent=2))
    print(f"{next(iter(table.values()))['users']} new users; saved {args.out / 'new-users.json'}")


if __name__ == "__main__":
    main()
