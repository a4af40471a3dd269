"""Known-answer tests of the ranking metrics and both protocols."""

import math

import numpy as np
import pytest

from shared.metrics import hit, mean_metrics, ndcg, rank_of, table, user_metrics


def test_rank_counts_ties_against_the_target():
    assert rank_of(0.5, np.array([0.9, 0.1, 0.2])) == 1
    assert rank_of(0.5, np.array([0.5, 0.5])) == 2  # a constant scorer earns nothing
    assert rank_of(1.0, np.array([0.0, 0.2])) == 0


def test_hit_and_ndcg_by_hand():
    assert hit(9, 10) == 1.0 and hit(10, 10) == 0.0
    assert ndcg(0, 10) == 1.0
    assert ndcg(1, 10) == pytest.approx(1 / math.log2(3))
    assert ndcg(9, 10) == pytest.approx(1 / math.log2(11))
    assert ndcg(10, 10) == 0.0


def test_user_metrics_on_a_hand_built_ranking():
    n = 30
    scores = np.arange(n, dtype=float)[::-1].copy()  # item 0 best, item 29 worst
    train = np.array([0, 1, 2])  # known items: masked in the full protocol
    val, test = 5, 14
    val_neg = np.array([3, 4, 20, 21])  # 2 negatives above val -> rank 2
    test_neg = np.array([25, 26])  # none above test -> rank 0
    m = user_metrics(scores, train, val, test, val_neg, test_neg)
    assert m["sampled-99/val/hr@10"] == 1.0
    assert m["sampled-99/val/ndcg@10"] == pytest.approx(1 / math.log2(4))
    assert m["sampled-99/test/ndcg@10"] == 1.0
    # full, val: items 3, 4 outrank item 5 once 0-2 are masked -> rank 2
    assert m["full/val/ndcg@10"] == pytest.approx(1 / math.log2(4))
    # full, test: 3,4,6..13 outrank 14 (train and val masked) -> rank 10: outside top 10, inside top 20
    assert m["full/test/hr@10"] == 0.0
    assert m["full/test/recall@20"] == 1.0


def test_test_scores_rank_the_test_item_and_leave_validation_alone():
    n = 30
    scores = np.arange(n, dtype=float)[::-1].copy()
    train, val, test = np.array([0, 1, 2]), 5, 14
    val_neg, test_neg = np.array([3, 4, 20, 21]), np.array([25, 26])
    test_scores = scores.copy()
    test_scores[25] = 100.0  # only the test ranking sees this: one negative above the test item -> rank 1
    m = user_metrics(scores, train, val, test, val_neg, test_neg, test_scores)
    assert m["sampled-99/test/ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert m["sampled-99/val/ndcg@10"] == pytest.approx(1 / math.log2(4))  # as without test_scores


def test_mean_and_table():
    rows = [{"full/test/hr@10": 1.0, "full/test/ndcg@10": 0.5}, {"full/test/hr@10": 0.0, "full/test/ndcg@10": 0.0}]
    mean = mean_metrics(rows)
    assert mean["full/test/hr@10"] == 0.5
    assert table(mean)["full"] == {"hr@10": 0.5, "ndcg@10": 0.25}
