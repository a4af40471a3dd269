"""Interest tags: what items are about, and what a user is interested in, derived on the device.

An item's tags are its genres and tags columns (`|`-separated lists in items.csv) and the keywords of
its text (`shared.text.analysis`), lower-cased. A user's interest tags are derived from the history held
on the device: each tag scores the behaviour weights of the watched items that carry it, times its
inverse document frequency over the catalogue (so that a tag most items have, such as "drama" on
MovieLens, does not crowd out the telling ones); a tag counts only when at least `MIN_SUPPORT` watched
items carry it (one film's title word is that film, not an interest). The user may add and
remove tags; the edits live in the device's own state directory (`interests.json`) and are never sent.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

TAG_COLUMNS = ("genres", "tags")
EDITS_FILE = "interests.json"
MIN_SUPPORT = 2


def normalise_tag(tag: str) -> str:
    return " ".join(tag.strip().lower().split())


def catalogue_tags(items, extra: Sequence[Iterable[str]] | None = None) -> list[list[str]]:
    """One sorted tag list per item of an items.csv frame: its genres and tags, plus `extra[i]` (for example
    keywords extracted from the item's text)."""
    out = []
    for i in range(len(items)):
        tags: set[str] = set()
        for column in TAG_COLUMNS:
            if column in items.columns:
                tags.update(normalise_tag(t) for t in str(items[column].iloc[i] or "").split("|"))
        if extra is not None:
            tags.update(normalise_tag(t) for t in extra[i])
        tags.discard("")
        tags.discard("unknown")  # MovieLens's placeholder genre
        out.append(sorted(tags))
    return out


@dataclass
class TagEdits:
    """Tags the user added (wanted more of) and removed (wanted less of), kept on the device."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: str | Path) -> "TagEdits":
        path = Path(state_dir) / EDITS_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls([normalise_tag(t) for t in data["added"]], [normalise_tag(t) for t in data["removed"]])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a tag-edits file ({exc}); expected {{\"added\": [...], \"removed\": [...]}}; "
                             "it was edited by hand or truncated: fix or delete it") from exc

    def edit(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> "TagEdits":
        """These edits with `add` and `remove` applied (a tag added again after removal is un-removed)."""
        added, removed = list(self.added), list(self.removed)
        for tag in map(normalise_tag, add):
            removed = [t for t in removed if t != tag]
            added += [] if tag in added else [tag]
        for tag in map(normalise_tag, remove):
            added = [t for t in added if t != tag]
            removed += [] if tag in removed else [tag]
        return TagEdits(added, removed)

    def save(self, state_dir: str | Path) -> None:
        path = Path(state_dir) / EDITS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)  # a new device may hold no state yet
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"added": self.added, "removed": self.removed}, indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


@dataclass
class Interests:
    """A user's interest tags: those derived from the history (tag -> weight, the strongest 1.0) after the
    user's edits."""

    derived: dict[str, float]
    edits: TagEdits = field(default_factory=TagEdits)

    @property
    def tags(self) -> dict[str, float]:
        """The profile shown to the user: derived tags minus removed ones, plus added ones at weight 1."""
        out = {t: w for t, w in self.derived.items() if t not in self.edits.removed}
        out.update({t: 1.0 for t in self.edits.added})
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def derive_interests(
    history: Sequence[int], weights: np.ndarray, item_tags: Sequence[Sequence[str]], top: int = 10
) -> dict[str, float]:
    """The `top` tags of the history items, scored by behaviour weight times inverse document frequency,
    among those that at least `MIN_SUPPORT` history items carry."""
    n_items = len(item_tags)
    df = Counter(t for tags in item_tags for t in tags)
    score: Counter = Counter()
    support: Counter = Counter()
    for item, weight in zip(history, weights):
        for tag in item_tags[item]:
            score[tag] += float(weight) * math.log(1.0 + n_items / df[tag])
            support[tag] += 1
    best = [(t, s) for t, s in score.most_common() if support[t] >= MIN_SUPPORT][:top]
    if not best or best[0][1] <= 0:
        return {}
    return {t: round(s / best[0][1], 4) for t, s in best if s > 0}
