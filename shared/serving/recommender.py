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

from shared.model import TwoTower, recent_contexts
from shared.serving.tags import Interests

EPS = 1e-12  # F.normalize's floor on the norm


@dataclass(frozen=True)
class Catalogue:
    """What the device knows about each item (row order of the model's item tower)."""

    item_ids: Sequence[str]
    titles: Sequence[str]
    tags: Sequence[Sequence[str]]

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
    contributions: dict[str, float]  # the score split by modality, 'id' and 'offset' (sums to score)
    tags: list[str]  # the user's interest tags this item carries
    user_parts: dict[str, float] = field(default_factory=dict)  # history items, private vector, offset (sum to score)

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
        index: dict[str, list[int]] = {}
        for i, tags in enumerate(catalogue.tags):
            for tag in tags:
                index.setdefault(tag, []).append(i)
        self.tag_items = {t: torch.as_tensor(v) for t, v in index.items()}

    @torch.no_grad()
    def _user(self, history: np.ndarray, private: torch.Tensor | None) -> _User:
        m = self.model
        hist = torch.as_tensor(np.array(history, dtype=np.int64))
        rows = m.history_rows[hist]
        parts = m.users.history(rows) / rows.sum(0).norm().clamp(min=EPS)
        weights = m.users.recent_weights
        if weights is not None and len(hist):
            k = weights.weight.shape[1]
            context = recent_contexts(hist.numpy(), k)[-1]
            valid = (context >= 0).float()
            w = weights.weight[0] * valid / valid.sum().clamp(min=1.0)
            for j in range(k):
                if context[j] >= 0:
                    parts[len(hist) - k + j] += w[j] * self.vectors[context[j]]
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
    ) -> list[Recommendation]:
        """The top `k` items the user has not consumed (`history` and `exclude`), each explained by its
        `explain` most supporting history items, its modality contributions and its matched tags.
        `private`: the device's private user vector (None for a user who has none yet)."""
        if k < 1:
            raise ValueError(f"k = {k}: expected at least 1 recommendation")
        user = self._user(history, private)
        scores = self.model.logit_scale * self.vectors @ user.vector + self.offsets
        ranked = scores + self.tag_bonus(interests, tag_boost)
        seen = torch.as_tensor(np.concatenate([np.asarray(history, dtype=np.int64), np.asarray(exclude, dtype=np.int64)]))
        ranked[seen] = -torch.inf
        k = min(k, int(torch.isfinite(ranked).sum()))
        top = torch.topk(ranked, k).indices.tolist()
        profile = interests.tags if interests is not None else {}
        return [self._explain(i, float(scores[i]), float(ranked[i]), user, history, profile, explain) for i in top]

    def _explain(self, i: int, score: float, rank_score: float, user: _User, history: np.ndarray,
                 profile: dict[str, float], explain: int) -> Recommendation:
        scale = self.model.logit_scale
        titles = self.catalogue.titles
        by_history = (scale * user.parts @ self.vectors[i] / user.norm).tolist()
        order = np.argsort(by_history)[::-1][:explain]
        because = [(titles[history[j]], by_history[j]) for j in order if by_history[j] > 0]
        user_parts = {f"history:{self.catalogue.item_ids[h]}": c for h, c in zip(history, by_history)}
        user_parts["private vector"] = float(scale * user.private @ self.vectors[i] / user.norm)
        user_parts["offset"] = float(self.offsets[i])
        return Recommendation(
            i, self.catalogue.item_ids[i], titles[i], score, rank_score, because,
            self.modality_contributions(i, user.vector), [t for t in self.catalogue.tags[i] if t in profile],
            user_parts,
        )

    @torch.no_grad()
    def modality_contributions(self, i: int, user: torch.Tensor) -> dict[str, float]:
        """Item i's score for user vector `user`, split into each modality's projected content (times its
        fusion weight), its ID embedding and its offset."""
        tower = self.model.items
        mask = tower.content_mask[i]
        weights = torch.softmax(tower.modality_logits.weight[0].masked_fill(mask == 0, -1e9), dim=0) * mask
        parts = {name: weights[m] * tower.projections[m](getattr(tower, f"content_{m}")[i])
                 for m, name in enumerate(tower.modalities)}
        if tower.ids is not None and i < tower.n_catalogue:
            parts["id"] = tower.ids.weight[i]
        norm = sum(parts.values()).norm().clamp(min=EPS)
        out = {name: float(self.model.logit_scale * user @ p / norm) for name, p in parts.items()}
        out["offset"] = float(self.offsets[i])
        return out
