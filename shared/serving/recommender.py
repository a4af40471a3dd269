"""Top-k recommendations from the two towers, each explained by an exact decomposition of its score.

Item vectors are computed once per global model (`Recommender`); a request then costs one user vector,
one matrix-vector product over the catalogue and a top-k. The score of item i is
`logit_scale * <u, v_i> + offset_i` with u = z / |z|, where the user tower's pre-normalisation vector z is
a sum of parts: one per history item (its row of the history sum through the history projection, divided
by the sum's norm, plus its share of the recent-items term when it is one of the latest items) and the
private user vector. So the score splits exactly into per-history-item contributions ("because you
watched ..."), the private vector and the offset. Likewise v_i = f_i / |f_i| with f_i a sum of one
projected content vector per modality (times its fusion weight) and the ID embedding, which splits the
same score exactly by modality. Nothing here leaves the device: the history, the private vector and
the tags are the user's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from shared.model import TwoTower
from shared.serving.rerank import mmr
from shared.serving.tags import Interests

EPS = 1e-12  # F.normalize's floor on the norm


@dataclass(frozen=True)
class Catalogue:
    """What the device knows about each item (row order of the model's item tower)."""

    item_ids: Sequence[str]
    titles: Sequence[str]
    tags: Sequence[Sequence[str]]  # genres, tags and keywords (`shared.serving.tags.catalogue_tags`)
    sentiment: Sequence[float] | None = None  # of each item's text (`shared.text.analysis`)

    def __post_init__(self) -> None:
        if not len(self.item_ids) == len(self.titles) == len(self.tags):
            raise ValueError(f"catalogue has {len(self.item_ids)} ids, {len(self.titles)} titles and "
                             f"{len(self.tags)} tag lists; expected one of each per item")


@dataclass
class Recommendation:
    item: int  # row in the catalogue
    item_id: str
    title: str
    score: float  # the model's score
    rank_score: float  # score plus the bonus of tags the user added or removed: what the list is ordered by
    because: list[tuple[str, float]]  # history items that add most to the score (title, score units)
    contributions: dict[str, float]  # the score split by the modalities it has, 'id' and 'offset' (sums to score)
    tags: list[str]  # the user's interest tags this item carries
    user_parts: dict[str, float] = field(default_factory=dict)  # the score split into history, private vector, offset
    sentiment: float | None = None  # the tone of the item's text, -1 to 1, where the catalogue has it

    @property
    def shares(self) -> dict[str, float]:
        """Each part's share of the score's magnitude: |contribution| / sum of |contributions|."""
        total = sum(abs(v) for v in self.contributions.values()) or 1.0
        return {k: abs(v) / total for k, v in self.contributions.items()}


@dataclass
class _User:
    parts: torch.Tensor  # (H, d): each history position's part of z
    private: torch.Tensor  # (d,)
    norm: float  # |z|
    vector: torch.Tensor  # u


class Recommender:
    """Ranks a catalogue for one device's user with a given model; build once per global model."""

    def __init__(self, model: TwoTower, catalogue: Catalogue) -> None:
        if model.items.n_items != len(catalogue.item_ids):
            raise ValueError(f"the model's item tower has {model.items.n_items} items but the catalogue "
                             f"{len(catalogue.item_ids)}: the run was trained on another items.csv")
        self.model = model.eval()
        self.catalogue = catalogue
        with torch.no_grad():
            items = torch.arange(model.items.n_items)
            self.vectors = model.items(items)
            self.offsets = model.items.offset(items)
            self.history_parts = model.users.history(model.history_rows)
            self.content = F.normalize(model.history_rows, dim=-1)  # content space, for diversity
        index: dict[str, list[int]] = {}
        for i, tags in enumerate(catalogue.tags):
            for tag in tags:
                index.setdefault(tag, []).append(i)
        self.tag_items = {t: torch.as_tensor(v) for t, v in index.items()}

    @torch.no_grad()
    def _user(self, history: np.ndarray, private: torch.Tensor | None) -> _User:
        m = self.model
        hist = torch.as_tensor(np.array(history, dtype=np.int64))
        # The history projection is linear: each item's projected row is cached, only the norm is per user.
        parts = self.history_parts[hist] / m.history_rows[hist].sum(0).norm().clamp(min=EPS)
        weights = m.users.recent_weights
        if weights is not None and len(hist):
            latest = hist[-weights.weight.shape[1]:]  # the recent items, oldest first, as `recent_contexts` pads them
            w = weights.weight[0, -len(latest):] / len(latest)
            parts[len(hist) - len(latest):] += w[:, None] * self.vectors[latest]
        if private is None:  # a user without a trained private vector (a new device): the shared towers alone
            private = torch.zeros(self.vectors.shape[1])
        z = parts.sum(0) + private
        norm = float(z.norm().clamp(min=EPS))
        return _User(parts, private, norm, z / norm)

    @torch.no_grad()
    def scores(self, history: np.ndarray, private: torch.Tensor | None = None) -> torch.Tensor:
        """The model's score of every item for a user with this history (time order) and private vector."""
        return self.model.logit_scale * self.vectors @ self._user(history, private).vector + self.offsets

    def tag_bonus(self, interests: Interests | None, boost: float) -> torch.Tensor:
        """`boost` per tag the user added that an item carries, minus `boost` per removed tag it carries."""
        bonus = torch.zeros(len(self.vectors))
        if interests is not None and boost:
            for sign, tags in ((1.0, interests.edits.added), (-1.0, interests.edits.removed)):
                for tag in tags:
                    if tag in self.tag_items:
                        bonus[self.tag_items[tag]] += sign * boost
        return bonus

    @torch.no_grad()
    def recommend(
        self,
        history: np.ndarray,
        private: torch.Tensor | None = None,
        k: int = 10,
        interests: Interests | None = None,
        tag_boost: float = 1.0,
        explain: int = 3,
        exclude: Sequence[int] = (),
        diversity: float = 0.0,
    ) -> list[Recommendation]:
        """The top `k` items the user has not consumed (`history` and `exclude`), each explained by its
        `explain` most supporting history items, its modality contributions and its matched tags;
        `diversity` > 0 re-ranks them for spread in content space (`shared.serving.rerank`).
        `private`: the device's private user vector (None for a user who has none yet)."""
        user = self._user(history, private)
        scores = self.model.logit_scale * self.vectors @ user.vector + self.offsets
        ranked = scores + self.tag_bonus(interests, tag_boost)
        top = torch.as_tensor(self._top(ranked, history, k, exclude, diversity), dtype=torch.long)
        profile = interests.tags if interests is not None else {}
        scale, titles = self.model.logit_scale, self.catalogue.titles
        # (k, H): each history item's part of each recommendation's score, in one product.
        by_history = scale * self.vectors[top] @ user.parts.T / user.norm
        private = scale * self.vectors[top] @ user.private / user.norm
        modalities = self.modality_contributions(top, user.vector)
        present = dict(zip(self.model.items.modalities, self.model.items.content_mask[top].T.bool()))
        out = []
        for row, i in enumerate(top.tolist()):
            support = by_history[row]
            best = torch.topk(support, min(explain, len(support))).indices.tolist() if explain else []
            out.append(Recommendation(
                i, self.catalogue.item_ids[i], titles[i], float(scores[i]), float(ranked[i]),
                [(titles[history[j]], float(support[j])) for j in best if support[j] > 0],
                {name: float(v[row]) for name, v in modalities.items() if name not in present or present[name][row]},
                [t for t in self.catalogue.tags[i] if t in profile],
                {"history": float(support.sum()), "private vector": float(private[row]), "offset": float(self.offsets[i])},
                None if self.catalogue.sentiment is None else float(self.catalogue.sentiment[i]),
            ))
        return out

    def _top(self, ranked: torch.Tensor, history: np.ndarray, k: int, exclude: Sequence[int], diversity: float) -> list[int]:
        if k < 1:
            raise ValueError(f"k = {k}: expected at least 1 recommendation")
        seen = np.concatenate([np.asarray(history, dtype=np.int64), np.asarray(exclude, dtype=np.int64)])
        ranked = ranked.clone()
        ranked[torch.as_tensor(seen)] = -torch.inf
        return mmr(ranked, self.content, k, diversity)

    @torch.no_grad()
    def rank(self, history: np.ndarray, private: torch.Tensor | None = None, k: int = 10,
             exclude: Sequence[int] = (), diversity: float = 0.0) -> list[int]:
        """`recommend`'s list without explanations or tag edits: the items alone."""
        return self._top(self.scores(history, private), history, k, exclude, diversity)

    @torch.no_grad()
    def modality_contributions(self, items: torch.Tensor, user: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scores of `items` (n,) for user vector `user`, split into each modality's projected content
        (times its fusion weight), the ID embedding and the offset: name -> (n,)."""
        tower = self.model.items
        mask = tower.content_mask[items]
        weights = torch.softmax(tower.modality_logits.weight[0].masked_fill(mask == 0, -1e9), dim=-1) * mask
        parts = {name: weights[:, m : m + 1] * tower.projections[m](getattr(tower, f"content_{m}")[items])
                 for m, name in enumerate(tower.modalities)}
        if tower.ids is not None:
            parts["id"] = tower.ids.weight[items.clamp(max=tower.n_catalogue - 1)] * (items < tower.n_catalogue)[:, None]
        norm = sum(parts.values()).norm(dim=-1).clamp(min=EPS)
        out = {name: self.model.logit_scale * (p @ user) / norm for name, p in parts.items()}
        out["offset"] = self.offsets[items]
        return out
