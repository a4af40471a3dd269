"""Tests for the leave-one-out split (shared.data.split) and the planted synthetic data."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shared.data.dataset import Dataset, DatasetError, load_dataset
from shared.data.movielens import default_data_root, import_ml100k
from shared.data.split import leave_one_out, user_negatives
from shared.data.synthetic import CLUSTER_WORDS, planted_clusters, write_planted_dataset

N_ITEMS = 30


def make_dataset(root: Path, rows: list[tuple[str, int, int]], n_items: int = N_ITEMS) -> Dataset:
    """rows: (user_id, item index, timestamp); item ids are 'it<index>'."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.csv").write_text("item_id,title\n" + "".join(f"it{i},title {i}\n" for i in range(n_items)))
    (root / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},it{i},{t}\n" for u, i, t in rows)
    )
    return load_dataset(root)


# user "a": file order scrambled; times 10..50; 3 and 4 tie at t=40 -> file order decides
ROWS_A = [("a", 5, 30), ("a", 3, 40), ("a", 7, 10), ("a", 9, 50), ("a", 4, 40), ("a", 1, 20)]
# user "b": minimal (train 1 item)
ROWS_B = [("b", 2, 300), ("b", 8, 100), ("b", 6, 200)]


def test_known_train_val_test(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, ROWS_A + ROWS_B)
    split = leave_one_out(ds, seed=0, n_negatives=5)
    assert [u.user for u in split.users] == [0, 1]
    a, b = split.users
    assert a.train.tolist() == [7, 1, 5, 3]
    assert (a.val, a.test) == (4, 9)
    assert b.train.tolist() == [8]
    assert (b.val, b.test) == (6, 2)
    assert a.train.dtype == np.int64 and a.val_negatives.dtype == np.int64
    assert (split.n_items, split.seed, split.n_negatives, split.dropped_users) == (N_ITEMS, 0, 5, 0)


def test_negatives_exclude_interacted_and_are_unique(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, ROWS_A + ROWS_B)
    n_neg = N_ITEMS - 6  # user "a" has exactly 24 non-interacted items: all must be used
    split = leave_one_out(ds, seed=3, n_negatives=n_neg, min_train=0)
    a, b = split.users
    seen_a = {7, 1, 5, 3, 4, 9}
    for us, seen in ((a, seen_a), (b, {8, 6, 2})):
        for neg in (us.val_negatives, us.test_negatives):
            assert neg.shape == (n_neg,)
            assert len(set(neg.tolist())) == n_neg
            assert not set(neg.tolist()) & seen
            assert neg.min() >= 0 and neg.max() < N_ITEMS
    assert set(a.val_negatives.tolist()) == set(range(N_ITEMS)) - seen_a
    with pytest.raises(DatasetError, match=r"user_id 'a'.*eval-negatives = 25"):
        leave_one_out(ds, seed=3, n_negatives=n_neg + 1)


def test_negatives_reproducible_seed_dependent_and_independent_of_other_users(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "two", ROWS_A + ROWS_B)
    s1 = leave_one_out(ds, seed=7, n_negatives=10)
    s2 = leave_one_out(load_dataset(tmp_path / "two"), seed=7, n_negatives=10)
    s3 = leave_one_out(ds, seed=8, n_negatives=10)
    for x, y in zip(s1.users, s2.users):
        np.testing.assert_array_equal(x.val_negatives, y.val_negatives)
        np.testing.assert_array_equal(x.test_negatives, y.test_negatives)
    assert any(
        not np.array_equal(x.val_negatives, z.val_negatives) for x, z in zip(s1.users, s3.users)
    )
    # val and test negatives are two different draws
    assert not np.array_equal(s1.users[0].val_negatives, s1.users[0].test_negatives)
    # more users (sorted after "a" and "b", so indices 0/1 keep their users): same negatives
    extra = [("c", 11, 1), ("c", 12, 2), ("c", 13, 3), ("d", 14, 1), ("d", 0, 2), ("d", 29, 3)]
    s4 = leave_one_out(make_dataset(tmp_path / "four", extra + ROWS_B + ROWS_A), seed=7, n_negatives=10)
    for x, y in zip(s1.users, s4.users[:2]):
        assert x.user == y.user
        np.testing.assert_array_equal(x.val_negatives, y.val_negatives)
        np.testing.assert_array_equal(x.test_negatives, y.test_negatives)
    # a user alone (index 0 in its own dataset) gets the same as index 0 elsewhere
    s5 = leave_one_out(make_dataset(tmp_path / "one", ROWS_A), seed=7, n_negatives=10)
    np.testing.assert_array_equal(s5.users[0].test_negatives, s1.users[0].test_negatives)
    # the specified recipe: default_rng([seed, user index]), val drawn first, from the sorted
    # non-interacted items
    rng = np.random.default_rng([7, 1])
    cands = np.array(sorted(set(range(N_ITEMS)) - {2, 8, 6}))
    np.testing.assert_array_equal(s1.users[1].val_negatives, rng.choice(cands, 10, replace=False))
    np.testing.assert_array_equal(s1.users[1].test_negatives, rng.choice(cands, 10, replace=False))
    # the helper reproduces them from the user's own data
    val, test = user_negatives(7, 1, np.array([2, 8, 6]), N_ITEMS, 10)
    np.testing.assert_array_equal(val, s1.users[1].val_negatives)
    np.testing.assert_array_equal(test, s1.users[1].test_negatives)


def test_short_users_raise_or_are_dropped(tmp_path: Path) -> None:
    short = [("s1", 0, 1), ("s1", 1, 2), ("s2", 3, 5)]
    ds = make_dataset(tmp_path, ROWS_A + ROWS_B + short)
    with pytest.raises(DatasetError) as info:
        leave_one_out(ds, seed=0, n_negatives=3)
    msg = str(info.value)
    assert "2 user(s)" in msg and "'s1' (2)" in msg and "'s2' (1)" in msg
    assert "--set drop-short-users=true" in msg  # a fix reachable from the CLI
    split = leave_one_out(ds, seed=0, n_negatives=3, drop_short_users=True)
    assert split.dropped_users == 2
    assert [ds.user_ids[u.user] for u in split.users] == ["a", "b"]
    # min_train=2 makes "b" (3 interactions) short too
    split = leave_one_out(ds, seed=0, n_negatives=3, min_train=2, drop_short_users=True)
    assert split.dropped_users == 3 and [u.user for u in split.users] == [0]
    # min_train=0 keeps "s1": no train items
    split = leave_one_out(ds, seed=0, n_negatives=3, min_train=0, drop_short_users=True)
    assert split.dropped_users == 1
    s1 = next(u for u in split.users if ds.user_ids[u.user] == "s1")
    assert s1.train.tolist() == [] and (s1.val, s1.test) == (0, 1)


_DATA_ROOT = default_data_root()
_HAVE_ML = _DATA_ROOT is not None and (_DATA_ROOT / "ml-100k" / "u.data").is_file()


@pytest.mark.skipif(not _HAVE_ML, reason="MovieLens-100K not available (set AVREC_DATA_DIR)")
def test_movielens_split_is_fast_and_consistent(tmp_path: Path) -> None:
    assert _DATA_ROOT is not None
    ds = load_dataset(import_ml100k(_DATA_ROOT / "ml-100k", tmp_path / "ml", None))
    start = time.perf_counter()
    split = leave_one_out(ds, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, elapsed
    assert len(split.users) == 943 and split.dropped_users == 0
    assert sum(len(u.train) + 2 for u in split.users) == 100_000
    inter = ds.interactions
    u0 = split.users[0]
    seq = inter.loc[inter["user"] == 0]
    assert u0.test == int(seq["item"].iloc[-1]) and u0.val == int(seq["item"].iloc[-2])
    assert seq["timestamp"].is_monotonic_increasing
    seen = set(seq["item"].tolist())
    assert len(u0.test_negatives) == 99 and not set(u0.test_negatives.tolist()) & seen


# ---------------------------------------------------------------------------
# Planted synthetic data
# ---------------------------------------------------------------------------


def _hit_rate(split_users: list, scores: np.ndarray, k: int = 10) -> float:
    hits = 0
    for us in split_users:
        cands = np.concatenate(([us.test], us.test_negatives))
        s = scores[us.user][cands] if scores.ndim == 2 else scores[cands]
        rank = int((s[1:] >= s[0]).sum())  # pessimistic: ties with negatives count against
        hits += rank < k
    return hits / len(split_users)


def test_planted_dataset_properties_and_a_content_model_wins(tmp_path: Path) -> None:
    root = write_planted_dataset(tmp_path / "p", seed=1)
    again = write_planted_dataset(tmp_path / "q", seed=1)
    other = write_planted_dataset(tmp_path / "r", seed=2)
    assert (root / "interactions.csv").read_text() == (again / "interactions.csv").read_text()
    assert (root / "items.csv").read_text() == (again / "items.csv").read_text()
    assert (root / "interactions.csv").read_text() != (other / "interactions.csv").read_text()

    ds = load_dataset(root)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (40, 60, 800)
    assert ds.report["duplicate_interactions_dropped"] == 0
    clusters = planted_clusters(60, 3)
    titles = list(ds.items["title"])
    for title, c in zip(titles, clusters):
        tokens = set(title.lower().split())
        assert tokens & set(CLUSTER_WORDS[c]), title
        assert not tokens & set().union(*(CLUSTER_WORDS[o] for o in range(3) if o != c)), title
    assert titles[0].split()[-1] == "1" and len(set(titles)) == 60
    inter = ds.interactions
    # ~90% of each user's interactions from their preferred cluster (user index u -> u % 3)
    pref = clusters[inter["item"].to_numpy()] == inter["user"].to_numpy() % 3
    assert pref.mean() == pytest.approx(0.9)
    # nearly uniform popularity
    pop = np.bincount(inter["item"].to_numpy(), minlength=60)
    assert pop.max() - pop.min() <= 2, pop
    # timestamps increase per user and over the file
    assert (np.diff(inter.groupby("user")["timestamp"].apply(list).iloc[0]) > 0).all()
    raw_ts = [int(line.split(",")[2]) for line in (root / "interactions.csv").read_text().splitlines()[1:]]
    assert raw_ts == sorted(raw_ts) and len(set(raw_ts)) == len(raw_ts)

    split = leave_one_out(ds, seed=0, n_negatives=20)
    # popularity from training data only
    train_pop = np.zeros(60)
    for us in split.users:
        np.add.at(train_pop, us.train, 1)
    hr_pop = _hit_rate(split.users, train_pop)
    # content model: title-word overlap with the user's training titles
    words = [set(t.lower().split()[:-1]) for t in titles]  # drop the number
    vocab = sorted(set().union(*words))
    x = np.array([[w in ws for w in vocab] for ws in words], dtype=float)
    scores = np.zeros((ds.n_users, 60))
    for us in split.users:
        scores[us.user] = x @ x[us.train].sum(axis=0)
    hr_content = _hit_rate(split.users, scores)
    assert hr_content >= 0.75 and hr_content - hr_pop >= 0.5, (hr_content, hr_pop)
    assert Counter(clusters[[us.test for us in split.users]]).most_common(1)[0][1] < 25
