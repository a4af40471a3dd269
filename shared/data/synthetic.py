"""Planted-preference synthetic dataset (generic format) for tests and sanity checks.

Items belong to clusters whose titles carry distinct words (cluster 0 "space battle
starship ...", cluster 1 "romantic love wedding ...", cluster 2 "detective murder crime
...", ...); each user prefers one cluster and ~90% of their interactions come from it,
while overall item popularity is nearly uniform. A popularity baseline is therefore
poor, and a content or collaborative model that picks up the clusters wins clearly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["CLUSTER_WORDS", "CLUSTER_GENRES", "write_planted_dataset", "planted_clusters"]

#: Distinct title words per cluster (clusters beyond these get generated words).
CLUSTER_WORDS: tuple[tuple[str, ...], ...] = (
    ("space", "battle", "starship", "galaxy", "alien", "planet", "laser", "orbit"),
    ("romantic", "love", "wedding", "heart", "kiss", "bride", "valentine", "honeymoon"),
    ("detective", "murder", "crime", "police", "clue", "suspect", "killer", "heist"),
    ("haunted", "ghost", "horror", "demon", "curse", "nightmare", "zombie", "vampire"),
    ("cowboy", "western", "sheriff", "outlaw", "saloon", "frontier", "ranch", "stagecoach"),
    ("cartoon", "puppy", "talking", "animals", "kids", "magic", "fairy", "toyland"),
    ("soldier", "platoon", "trench", "army", "general", "sniper", "bunker", "regiment"),
    ("music", "band", "concert", "guitar", "singer", "dance", "rock", "melody"),
)
#: Genre label per cluster (clusters beyond these get "Cluster<k>").
CLUSTER_GENRES: tuple[str, ...] = (
    "Sci-Fi", "Romance", "Crime", "Horror", "Western", "Animation", "War", "Musical",
)
_BASE_TIME = 1_600_000_000
_STEP = 60


def planted_clusters(n_items: int, n_clusters: int) -> np.ndarray:
    """Cluster of each item index (item i belongs to cluster i % n_clusters)."""
    return np.arange(n_items, dtype=np.int64) % n_clusters


def _words(cluster: int) -> tuple[str, ...]:
    if cluster < len(CLUSTER_WORDS):
        return CLUSTER_WORDS[cluster]
    return tuple(f"topic{cluster}{suffix}" for suffix in ("alpha", "beta", "gamma", "delta", "omega"))


def _least_used(counts: np.ndarray, pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k items of ``pool`` with the lowest counts, ties broken at random."""
    shuffled = rng.permutation(pool)
    return shuffled[np.argsort(counts[shuffled], kind="stable")[:k]]


def write_planted_dataset(
    out_dir: Path,
    n_users: int = 40,
    n_items: int = 60,
    n_clusters: int = 3,
    interactions_per_user: int = 20,
    seed: int = 0,
) -> Path:
    """Write a planted-preference dataset (interactions.csv, items.csv) into ``out_dir``.

    User index u (user_id ``u+1``) prefers cluster ``u % n_clusters``; item index i
    (item_id ``i+1``) is in cluster ``i % n_clusters``. Each user has
    ``interactions_per_user`` distinct items, ``round(0.9 * interactions_per_user)`` of
    them from the preferred cluster, chosen so that item popularity stays nearly uniform.
    Timestamps increase (per user and over the file). Deterministic from ``seed``.
    """
    if n_clusters < 1 or n_users < 1 or interactions_per_user < 1:
        raise ValueError("n_users, n_clusters and interactions_per_user must be >= 1")
    clusters = planted_clusters(n_items, n_clusters)
    k_pref = int(round(0.9 * interactions_per_user)) if n_clusters > 1 else interactions_per_user
    k_other = interactions_per_user - k_pref
    smallest = int(np.bincount(clusters, minlength=n_clusters).min()) if n_items else 0
    if k_pref > smallest or k_other > n_items - smallest:
        raise ValueError(
            f"{interactions_per_user} interactions per user need {k_pref} items in every cluster "
            f"and {k_other} outside it; {n_items} items in {n_clusters} clusters give only "
            f"{smallest} per cluster"
        )
    rng = np.random.default_rng(seed)

    # Items.
    rows = []
    for i in range(n_items):
        c = int(clusters[i])
        words = _words(c)
        pick = rng.choice(len(words), size=min(5, len(words)), replace=False)
        w = [words[j] for j in pick]
        title = f"{w[0].capitalize()} {' '.join(w[1:3])} {i + 1}"
        genre = CLUSTER_GENRES[c] if c < len(CLUSTER_GENRES) else f"Cluster{c}"
        rows.append({"item_id": str(i + 1), "title": title, "genres": genre,
                     "description": f"A story of {w[3]} and {w[-1]}."})
    items = pd.DataFrame(rows, columns=["item_id", "title", "genres", "description"])

    # Interactions: preferred picks first (balanced within each cluster), then the
    # out-of-cluster picks from the globally least-used items.
    counts = np.zeros(n_items, dtype=np.int64)
    chosen: list[np.ndarray] = []
    all_items = np.arange(n_items)
    for u in range(n_users):
        pool = all_items[clusters == u % n_clusters]
        sel = _least_used(counts, pool, k_pref, rng)
        counts[sel] += 1
        chosen.append(sel)
    for u in rng.permutation(n_users):
        pool = all_items[clusters != u % n_clusters]
        sel = _least_used(counts, pool, k_other, rng)
        counts[sel] += 1
        chosen[u] = rng.permutation(np.concatenate([chosen[u], sel]))

    users_col, items_col, times_col = [], [], []
    for k in range(interactions_per_user):
        for u in range(n_users):
            users_col.append(str(u + 1))
            items_col.append(str(int(chosen[u][k]) + 1))
            times_col.append(_BASE_TIME + (k * n_users + u) * _STEP)
    interactions = pd.DataFrame({"user_id": users_col, "item_id": items_col, "timestamp": times_col})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items.to_csv(out / "items.csv", index=False)
    interactions.to_csv(out / "interactions.csv", index=False)
    return out
