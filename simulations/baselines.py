"""Reference systems evaluated on the same split and protocols as the federation:
- popularity: items ranked by how many users have them in training;
- central: the same two towers trained in one place without DP (every user's private vector in one
  table, exact history summaries, each example's loss weighted by its behaviour signal as on a device;
  dislikes are not drawn as negatives here), test metrics at the epoch with the best validation HR@10.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from client.history import release_history
from client.trainer import WeightedCrossEntropy, example_logits
from shared.config import RunConfig
from shared.data.split import UserSplit
from shared.features import ItemContent
from shared.metrics import mean_metrics, table, user_metrics
from shared.model import build_model, evaluation_inputs, recent_contexts
from server.records import SELECT_BY


def per_user_metrics(
    scores: np.ndarray, users: Sequence[UserSplit], test_scores: np.ndarray | None = None
) -> list[dict[str, float]]:
    """Each user's metrics; `scores` (and `test_scores`, see `user_metrics`) are (n_users, n_items) in the order
    of `users`."""
    return [user_metrics(scores[i], u.train, u.val, u.test, u.val_negatives, u.test_negatives,
                         None if test_scores is None else test_scores[i])
            for i, u in enumerate(users)]


def evaluate_scores(
    scores: np.ndarray, users: Sequence[UserSplit], test_scores: np.ndarray | None = None
) -> dict[str, float]:
    """Mean metrics over users (see `per_user_metrics`)."""
    return mean_metrics(per_user_metrics(scores, users, test_scores))


def popularity(users: Sequence[UserSplit], n_items: int) -> dict:
    counts = np.zeros(n_items)
    for u in users:
        np.add.at(counts, u.train, 1.0)
    metrics = evaluate_scores(np.tile(counts, (len(users), 1)), users)
    return {"test": table(metrics, "test"), "val": table(metrics, "val")}


def central(
    users: Sequence[UserSplit],
    content: ItemContent,
    n_items: int,
    cfg: RunConfig,
    epochs: int = 15,
    lr: float = 0.005,
    batch_size: int = 256,
    keep_scores: bool = False,
    per_user: bool = False,
) -> dict:
    """Train the two towers on all users' training interactions at once (no federation, no DP).

    The first `n_items` items are the training catalogue (ID embeddings, offsets, negatives); content rows
    after them are items never trained on, scored from content alone. With `keep_scores` the result holds
    `scores`, every user's scores of every item (content rows) from the training history at the selected
    epoch; with `per_user`, `per_user` holds each user's metrics at that epoch."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_model(content, n_items, cfg, n_users=len(users))  # every private vector in one table
    rows = content.history_rows
    histories = torch.stack([release_history(rows, u.train, 0.0, generator) for u in users])
    user_idx = torch.cat([torch.full((len(u.train),), i, dtype=torch.long) for i, u in enumerate(users)])
    targets = torch.cat([torch.as_tensor(u.train, dtype=torch.long) for u in users])
    example_weights = torch.cat([torch.ones(len(u.train)) if u.weights is None else torch.as_tensor(u.weights).float()
                                 for u in users])
    k = cfg.recent_items if cfg.train_recent else 0
    train_recent = torch.cat([recent_contexts(u.train, k)[:-1] for u in users]) if k else None
    # Per user two rows: rank the validation item, then the test item (see `evaluation_inputs`).
    evaluation = [evaluation_inputs(histories[i], rows, u.train, u.val, k) for i, u in enumerate(users)]
    eval_histories = torch.cat([h for h, _ in evaluation])
    eval_recent = torch.cat([r for _, r in evaluation]) if k else None
    eval_users = torch.arange(len(users)).repeat_interleave(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = WeightedCrossEntropy()
    best = None
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            b_users = user_idx[idx]
            users_in = b_users if cfg.private_user_vector else None
            recent = train_recent[idx] if k else None
            logits = example_logits(model, histories[b_users], targets[idx], n_items, cfg, generator, users_in, recent)
            loss = criterion(logits, example_weights[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        both = model.score_all(
            eval_histories, users=eval_users if cfg.private_user_vector else None, recent=eval_recent
        ).numpy()
        scores = both[0::2]
        rows = per_user_metrics(scores, users, both[1::2])
        metrics = mean_metrics(rows)
        if best is None or metrics[SELECT_BY] > best[1][SELECT_BY]:
            weights = dict(zip(model.items.modalities, model.items.modality_weights().tolist()))
            best = (epoch, metrics, weights, scores if keep_scores else None, rows if per_user else None)
    epoch, metrics, weights, best_scores, best_rows = best
    extra = {"scores": best_scores} if keep_scores else {}
    if per_user:
        extra["per_user"] = best_rows
    return {
        **extra,
        "modality_weights": weights,
        "test": table(metrics, "test"),
        "val": table(metrics, "val"),
        "best_epoch": epoch,
        "epochs": epochs,
        "seconds": round(time.perf_counter() - started, 1),
    }

