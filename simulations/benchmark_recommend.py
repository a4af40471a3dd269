"""Latency of `avrec recommend`'s serving path for catalogues of 10^4-10^5 items, on this CPU.

The run's real catalogue (MovieLens-100K's 1,682 items with their content embeddings and the run's
trained towers) is scaled up with synthetic items: each new item's content, per modality, is a random
mix of two real items' vectors (renormalised), its tags the union of theirs. New items have no ID
embedding or offset, so they take the content path, as an item added after training would. For each
size: the time to build the item index once per global model (every item vector), then per request
(one real user's history, private vector and interest tags) the time to score, exclude the user's items,
take the top k and explain each one (history items, modalities, tags): median, p95 and max over the
users' requests, one torch thread as on a device.

    python -m simulations.benchmark_recommend RUN_DIR [--sizes 1682,10000,30000,100000] [--users 50] [--out runs/benchmark-recommend]

The machine is shared: the load average before and after is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from client.serving import DeviceRecommender
from shared.features import ItemContent
from shared.model import build_model
from shared.serving.recommender import Catalogue, Recommender


def scaled(device: DeviceRecommender, n_items: int, seed: int = 0) -> Recommender:
    """The run's towers over the real catalogue plus synthetic content-only items up to `n_items`."""
    base = device.recommender
    real = base.model.items
    n_real = real.n_items
    rng = np.random.default_rng(seed)
    extra = n_items - n_real
    a, b = rng.integers(0, n_real, extra), rng.integers(0, n_real, extra)
    mix = torch.as_tensor(rng.uniform(0.2, 0.8, (extra, 1)), dtype=torch.float32)
    features = {}
    for m, name in enumerate(real.modalities):
        rows = getattr(real, f"content_{m}")
        features[name] = torch.cat([rows, torch.nn.functional.normalize(mix * rows[a] + (1 - mix) * rows[b], dim=-1)])
    mask = torch.cat([real.content_mask, ((real.content_mask[a] + real.content_mask[b]) > 0).float()])
    # Where a mixed item lacks a modality in both parents its row is zero: keep the mask consistent.
    for m, name in enumerate(real.modalities):
        mask[:, m] *= (features[name].abs().sum(1) > 0).float()
    content = ItemContent(features, mask, 0, 0.0)
    model = build_model(content, n_real, device.cfg)
    model.load_state_dict(base.model.state_dict(), strict=False)
    cat = base.catalogue
    catalogue = Catalogue(
        list(cat.item_ids) + [f"synthetic-{i}" for i in range(extra)],
        list(cat.titles) + [f"{cat.titles[i]} x {cat.titles[j]}" for i, j in zip(a, b)],
        list(cat.tags) + [sorted(set(cat.tags[i]) | set(cat.tags[j])) for i, j in zip(a, b)],
    )
    return Recommender(model, catalogue)


def measure(device: DeviceRecommender, n_items: int, users: list[str], k: int) -> dict:
    started = time.perf_counter()
    recommender = device.recommender if n_items == device.dataset.n_items else scaled(device, n_items)
    prepare = time.perf_counter() - started  # scaling the synthetic content: not part of serving
    started = time.perf_counter()
    recommender = Recommender(recommender.model, recommender.catalogue)
    index_seconds = time.perf_counter() - started
    views = [device.user(u) for u in users]
    profiles = [device.interests(v) for v in views]
    recommender.recommend(views[0].history, views[0].private, k, profiles[0])  # warm-up
    times = []
    for view, interests in zip(views, profiles):
        started = time.perf_counter()
        recs = recommender.recommend(view.history, view.private, k, interests)
        times.append(time.perf_counter() - started)
        assert len(recs) == k
    ms = np.array(times) * 1e3
    return {"items": n_items, "index_build_s": round(index_seconds, 4), "synthetic_content_s": round(prepare, 2),
            "item_vectors_mib": round(recommender.vectors.numel() * 4 / 2**20, 2),
            "request_ms_median": round(float(np.median(ms)), 2), "request_ms_p95": round(float(np.percentile(ms, 95)), 2),
            "request_ms_max": round(float(ms.max()), 2), "requests": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by `avrec simulate`")
    parser.add_argument("--sizes", default="1682,10000,30000,100000")
    parser.add_argument("--users", type=int, default=50, help="requests per size, one per user (the run's first users)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-recommend"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    device = DeviceRecommender.from_run(args.run_dir)
    users = device.dataset.user_ids[: args.users]
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        if size < device.dataset.n_items:
            raise SystemExit(f"--sizes: {size} is below the real catalogue's {device.dataset.n_items} items")
        rows.append(measure(device, size, users, args.k))
        r = rows[-1]
        print(f"{r['items']:>7} items: index {r['index_build_s'] * 1e3:8.1f} ms once per model; request median "
              f"{r['request_ms_median']:.2f} ms, p95 {r['request_ms_p95']:.2f} ms, max {r['request_ms_max']:.2f} ms "
              f"({r['requests']} users, top {args.k} with explanations)", flush=True)
    record = {"run_dir": str(args.run_dir.resolve()), "modalities": list(device.recommender.model.items.modalities),
              "k": args.k, "torch_threads": 1, "cpu": platform.processor() or platform.machine(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "sizes": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recommend.json").write_text(json.dumps(record, indent=2))
    print(f"saved {args.out / 'recommend.json'}")


if __name__ == "__main__":
    main()
