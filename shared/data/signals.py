"""Behaviour signals: what an interaction says beyond "consumed", as a training weight and a dislike.

The one place that maps events to training: the event vocabulary, MovieLens-style ratings to events, and
the `signal-weights` setting's format. `signals` (a run setting) picks the source:

* ``none``: every interaction is a click, a positive of weight 1 (the default);
* ``event``: the interactions' ``event`` column (play, like, skip, dislike; empty = play) and, where it has
  a value, ``watch_fraction`` in [0, 1], which multiplies the event's weight;
* ``rating``: the ``rating`` column on a 1-5 scale, 4-5 = like, 3 = play, 1-2 = dislike.

A positive's weight is `signal-weights`' value for its event (each in [0, 1]: under record-level DP a weight
scales one example's loss, so its clipped gradient stays within the clip norm); a weight-0 example adds
nothing to training (its loss is 0). A dislike is never a positive; with `dislike-negatives` > 0 it is
drawn as a negative for the same user's other examples (`client.trainer.example_draws`), which couples
records and is refused under record-level DP (`shared.config`). Signals stay on the device: they change
how it trains, never what it sends (the update's shape and the ledger are the same).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .dataset import EVENTS, Dataset, DatasetError
from .split import Split, leave_one_out

if TYPE_CHECKING:  # shared.config imports this module
    from shared.config import RunConfig

__all__ = ["SIGNALS", "EVENTS", "RATING_EVENTS", "parse_weights", "interaction_signals", "with_signals", "run_split"]

SIGNALS = ("none", "event", "rating")
#: ``rating`` signals: MovieLens's 1-5 stars as events.
RATING_EVENTS = {5: "like", 4: "like", 3: "play", 2: "dislike", 1: "dislike"}


def parse_weights(text: str) -> dict[str, float]:
    """`signal-weights` (``like=1,play=0.5,skip=0``) as a dict over the positive events; ValueError naming the
    part that is wrong. Every positive event needs a weight in [0, 1]; dislike takes none (never a positive)."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in EVENTS or name == "dislike":
            raise ValueError(f"{part!r}: expected event=weight with event one of like, play, skip (a dislike is "
                             "never a positive, so it takes no weight)")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: expected a number after '='") from None
        if not 0.0 <= weight <= 1.0:  # also false for NaN
            raise ValueError(f"{part!r}: expected a weight in [0, 1] (a weight scales its example's loss down, never "
                             "up, so no gradient grows past its unweighted one)")
        weights[name] = weight
    missing = [e for e in EVENTS if e != "dislike" and e not in weights]
    if missing:
        raise ValueError(f"{text!r}: no weight for {', '.join(missing)}; expected like=..,play=..,skip=..")
    return weights


def _events(dataset: Dataset, source: str) -> np.ndarray:
    """Each interaction's event (in `dataset.interactions` order)."""
    frame = dataset.interactions
    path = dataset.root / "interactions.csv"
    if source == "event":
        if "event" not in frame.columns:
            raise DatasetError(f"{path}: signals = event but the file has no event column; expected event values "
                               f"{', '.join(EVENTS)}. Likely cause: a dataset without events (use signals = none or "
                               "rating)", file=path, column="event")
        return frame["event"].astype(str).str.strip().replace("", "play").to_numpy()
    if "rating" not in frame.columns:
        raise DatasetError(f"{path}: signals = rating but the file has no rating column; expected ratings 1-5. "
                           "Likely cause: a dataset without ratings (use signals = none or event)",
                           file=path, column="rating")
    ratings = frame["rating"]
    known = ratings.isin(list(RATING_EVENTS)).to_numpy()
    if not known.all():
        bad = ratings.to_numpy()[~known][0]
        raise DatasetError(f"{path}: signals = rating but a rating is {bad!r} ({int((~known).sum())} such); expected "
                           "integers 1-5. Likely cause: another rating scale; map it to the event column and use "
                           "signals = event", file=path, column="rating")
    return ratings.map(RATING_EVENTS).to_numpy()


def interaction_signals(dataset: Dataset, source: str, weights: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(weight, dislike) per interaction of `dataset.interactions`: float64 in [0, 1] (0 for a dislike) and
    bool. `source` is a `signals` value; the event column's values were checked when the dataset was loaded."""
    n = len(dataset.interactions)
    if source == "none":
        return np.ones(n), np.zeros(n, dtype=bool)
    events = _events(dataset, source)
    dislike = events == "dislike"
    weight = np.array([0.0 if e == "dislike" else weights[e] for e in events])
    if source == "event" and "watch_fraction" in dataset.interactions.columns:
        fraction = dataset.interactions["watch_fraction"].replace("", np.nan).to_numpy(dtype=float)
        weight = np.where(np.isnan(fraction), weight, weight * fraction)
    return weight, dislike


def with_signals(split: Split, dataset: Dataset, source: str, weights: dict[str, float]) -> Split:
    """`split` with each user's train weights and dislikes (see `UserSplit`); unchanged for ``none``."""
    if source == "none":
        return split
    weight, dislike = interaction_signals(dataset, source, weights)
    frame = dataset.interactions
    # (user, item) pairs are unique after loading: find each train item's row by its key.
    keys = frame["user"].to_numpy(np.int64) * dataset.n_items + frame["item"].to_numpy(np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    users = []
    for u in split.users:
        rows = order[np.searchsorted(sorted_keys, u.user * dataset.n_items + u.train)]
        users.append(replace(u, weights=weight[rows], dislikes=u.train[dislike[rows]]))
    return replace(split, users=users)


def run_split(dataset: Dataset, cfg: "RunConfig") -> Split:
    """The leave-one-out split a run trains on, with its behaviour signals: what devices, the simulation's
    harness and the central baseline all use."""
    split = leave_one_out(dataset, cfg.seed, cfg.eval_negatives, drop_short_users=cfg.drop_short_users)
    return with_signals(split, dataset, cfg.signals, cfg.signal_weight_map)
