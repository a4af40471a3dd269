"""Leave-one-out split by time with sampled negative candidates for evaluation.

Per user (interactions in time order, ties broken by file order) the latest interaction is
the test item, the second latest the validation item and the rest are training items.
For validation and for test, ``n_negatives`` items are sampled uniformly without
replacement from the items the user never interacted with, using
``np.random.default_rng([seed, user])`` -- reproducible from the seed and independent of
the order in which users are processed (the protocol of published federated
recommenders: rank the held-out item among 1 + 99 candidates).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dataset import Dataset, DatasetError

__all__ = ["UserSplit", "Split", "leave_one_out", "user_negatives"]

_MAX_LISTED = 5


@dataclass(frozen=True, eq=False)
class UserSplit:
    """One user's train items (time order), held-out val/test items and their negatives, and the behaviour
    signals of the train items (`shared.data.signals.with_signals`): `weights` aligned with `train` (None = every
    interaction a click of weight 1; 0 = trained on with loss 0) and the items the user disliked. `train`
    stays every item the user consumed (history, masking); only training reads the signals."""

    user: int
    train: np.ndarray
    val: int
    test: int
    val_negatives: np.ndarray
    test_negatives: np.ndarray
    weights: np.ndarray | None = None
    dislikes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out split of a dataset: ``users`` in user index order."""

    users: list[UserSplit]
    n_items: int
    seed: int
    n_negatives: int
    dropped_users: int


def _draw(seed: int, user: int, candidates: np.ndarray, n_negatives: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, user])
    val = rng.choice(candidates, size=n_negatives, replace=False).astype(np.int64)
    test = rng.choice(candidates, size=n_negatives, replace=False).astype(np.int64)
    return val, test


def user_negatives(
    seed: int, user: int, interacted: np.ndarray, n_items: int, n_negatives: int = 99
) -> tuple[np.ndarray, np.ndarray]:
    """(val_negatives, test_negatives) of one user exactly as :func:`leave_one_out` draws them.

    ``user`` is the user index, ``interacted`` all item indices the user interacted with.
    Lets a client recompute its own candidates without the other users' data.
    """
    mask = np.ones(n_items, dtype=bool)
    mask[np.asarray(interacted, dtype=np.int64)] = False
    return _draw(seed, user, np.flatnonzero(mask), n_negatives)


def leave_one_out(
    dataset: Dataset,
    seed: int,
    n_negatives: int = 99,
    min_train: int = 1,
    drop_short_users: bool = False,
) -> Split:
    """Split each user's interactions: latest -> test, second latest -> val, rest -> train.

    Users with fewer than ``min_train + 2`` interactions raise DatasetError unless
    ``drop_short_users`` is set, in which case they are left out and counted in
    ``Split.dropped_users``. A user with fewer than ``n_negatives`` non-interacted items
    raises DatasetError. ``seed`` must be a non-negative integer.
    """
    if seed < 0 or n_negatives < 0 or min_train < 0:
        raise ValueError(f"seed, n_negatives and min_train must be >= 0 (got {seed}, {n_negatives}, {min_train})")
    inter = dataset.interactions
    users = inter["user"].to_numpy(dtype=np.int64)
    items = inter["item"].to_numpy(dtype=np.int64)
    n_items = dataset.n_items
    # Interactions are sorted by (user, timestamp, file order) and deduplicated by the loader;
    # re-sort stably by user only in case a caller built the frame differently.
    if len(users) > 1 and np.any(np.diff(users) < 0):
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
    counts = np.bincount(users, minlength=dataset.n_users)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))

    needed = min_train + 2
    short = np.flatnonzero(counts < needed)
    if len(short) and not drop_short_users:
        listed = ", ".join(f"{dataset.user_ids[u]!r} ({counts[u]})" for u in short[:_MAX_LISTED])
        more = " ..." if len(short) > _MAX_LISTED else ""
        raise DatasetError(
            f"{dataset.root / 'interactions.csv'}: {len(short)} user(s) have fewer than "
            f"min_train + 2 = {needed} interactions (user_id (count): {listed}{more}); expected "
            f"at least {needed} per user for a train/val/test split. Likely cause: a sparse "
            f"dataset; set drop-short-users = true (avrec simulate --set drop-short-users=true) to leave them out.",
            file=dataset.root / "interactions.csv",
        )

    out: list[UserSplit] = []
    mask = np.ones(n_items, dtype=bool)
    for u in range(dataset.n_users):
        c = int(counts[u])
        if c < needed:
            continue
        seq = items[starts[u] : starts[u] + c]
        mask[seq] = False
        candidates = np.flatnonzero(mask)
        mask[seq] = True
        if len(candidates) < n_negatives:
            raise DatasetError(
                f"{dataset.root / 'interactions.csv'}: user_id {dataset.user_ids[u]!r} interacted "
                f"with {n_items - len(candidates)} of {n_items} items, leaving {len(candidates)} "
                f"non-interacted items; expected at least eval-negatives = {n_negatives}. Likely "
                f"cause: too few items in the catalogue for this many negatives; lower eval-negatives "
                f"(--set eval-negatives=N).",
                file=dataset.root / "interactions.csv",
            )
        val_neg, test_neg = _draw(seed, u, candidates, n_negatives)
        out.append(
            UserSplit(
                user=u,
                train=seq[:-2].astype(np.int64, copy=True),
                val=int(seq[-2]),
                test=int(seq[-1]),
                val_negatives=val_neg,
                test_negatives=test_neg,
            )
        )
    return Split(
        users=out,
        n_items=n_items,
        seed=seed,
        n_negatives=n_negatives,
        dropped_users=int(len(short)) if drop_short_users else 0,
    )
