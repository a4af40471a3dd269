"""The two-tower recommender shared by devices and server.

Item tower: frozen content embeddings per modality (computed on the device) -> one trainable projection
per modality -> fused with learned modality weights (renormalised over the modalities an item has) ->
plus a learned item-ID embedding for items in the training catalogue -> L2-normalised item vector.
Items outside the catalogue, or with their ID dropped, are represented by content alone (cold start).

User tower: a summary of the user's history in content space (released with Gaussian noise under
record-level DP, see `client.history`) through a trainable projection, plus a position-weighted mean of
the item vectors of the user's latest items (trained where the privacy mode allows, fixed equal weights
under record-level DP, where they join only when the device ranks), plus an optional private
per-user vector -> L2-normalised user vector. In training, each example's history leaves out its own
target, so the tower learns to predict an item it has not been shown, as at serving time.
Score = logit_scale * cosine(user, item) + a learned per-item offset (catalogue items only).

Every trainable parameter sits in an `nn.Linear` or `nn.Embedding`, the layers for which Opacus computes
exact per-sample gradients and norms (ghost clipping); single vectors (modality weights, the private
user vector) are one-row embeddings looked up at index 0 for that reason.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

PRIVATE_PREFIX = "user_vector."  # parameters under this prefix never leave the device
PRIVATE_KEY = f"users.{PRIVATE_PREFIX}weight"  # the private user vector (one row on a device)


class ItemTower(nn.Module):
    def __init__(
        self,
        content: Mapping[str, torch.Tensor],
        content_mask: torch.Tensor,
        n_catalogue: int,
        dim: int,
        id_embeddings: bool = True,
        item_bias: bool = True,
    ) -> None:
        """`content[m]` is (n_items, d_m); `content_mask` (n_items, n_modalities) marks present ones.

        The first `n_catalogue` items have ID embeddings; items after them are content-only.
        """
        super().__init__()
        self.modalities = list(content)
        for i, name in enumerate(self.modalities):
            self.register_buffer(f"content_{i}", content[name].float(), persistent=False)
        self.register_buffer("content_mask", content_mask.float(), persistent=False)
        self.projections = nn.ModuleList(
            nn.Linear(content[m].shape[1], dim, bias=False) for m in self.modalities
        )
        self.modality_logits = nn.Embedding(1, len(self.modalities))
        nn.init.zeros_(self.modality_logits.weight)
        self.n_catalogue = n_catalogue
        self.ids = nn.Embedding(n_catalogue, dim) if id_embeddings else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.1)
        # A learned score offset per catalogue item: popularity in one number per item, which cosine
        # scores cannot express and which averages well across many noisy DP updates.
        self.bias = nn.Embedding(n_catalogue, 1) if item_bias else None
        if self.bias is not None:
            nn.init.zeros_(self.bias.weight)

    @property
    def n_items(self) -> int:
        return self.content_mask.shape[0]

    def modality_weights(self) -> torch.Tensor:
        return torch.softmax(self.modality_logits.weight[0], dim=0)

    def forward(self, items: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors (..., dim) for an index tensor (...). `id_keep` (same shape, bool) drops the ID
        embedding where False; items outside the catalogue never have one."""
        zero = torch.zeros(items.shape, dtype=torch.long, device=items.device)
        logits = self.modality_logits(zero)  # (..., M): one row, looked up per example for Opacus
        mask = self.content_mask[items]  # (..., M)
        weights = torch.softmax(logits.masked_fill(mask == 0, -1e9), dim=-1) * mask
        fused = 0
        for i, projection in enumerate(self.projections):
            fused = fused + weights[..., i : i + 1] * projection(getattr(self, f"content_{i}")[items])
        if self.ids is not None:
            known = items < self.n_catalogue
            if id_keep is not None:
                known = known & id_keep
            ids = self.ids(items.clamp(max=self.n_catalogue - 1))
            fused = fused + ids * known.unsqueeze(-1).to(ids.dtype)
        return F.normalize(fused, dim=-1)

    def offset(self, items: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Per-item score offsets (...), zero for items without an ID (new, or ID dropped)."""
        if self.bias is None:
            return torch.zeros(items.shape, device=items.device)
        known = items < self.n_catalogue
        if id_keep is not None:
            known = known & id_keep
        return self.bias(items.clamp(max=self.n_catalogue - 1)).squeeze(-1) * known.to(torch.float32)


class UserTower(nn.Module):
    def __init__(
        self, history_dim: int, dim: int, private_vector: bool = True, n_users: int = 1, recent_items: int = 0
    ) -> None:
        """A device holds one private vector (`n_users=1`); central training holds one per user.
        `recent_items` > 0 adds one learned weight per position of the latest items (oldest first)."""
        super().__init__()
        self.history = nn.Linear(history_dim, dim, bias=False)
        self.recent_weights = nn.Embedding(1, recent_items) if recent_items else None
        if self.recent_weights is not None:
            nn.init.ones_(self.recent_weights.weight)
        self.user_vector = nn.Embedding(n_users, dim) if private_vector else None
        if self.user_vector is not None:
            nn.init.normal_(self.user_vector.weight, std=0.1)

    def base(self, history: torch.Tensor, recent: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The user vector (B, dim) before the private vector is added and before normalising: the part the
        shared weights compute (see `forward`)."""
        user = self.history(history)
        if recent is not None and self.recent_weights is not None:
            vectors, valid = recent
            zero = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
            weights = self.recent_weights(zero) * valid  # (B, k): an Embedding row, like every parameter here (see top)
            user = user + (weights.unsqueeze(-1) * vectors).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)
        return user

    def forward(
        self,
        history: torch.Tensor,
        users: torch.Tensor | None = None,
        recent: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`history` (B, history_dim): each example's history summary; `users` (B,) indexes the private
        vectors (all 0 on a device); `recent`: the item vectors (B, k, dim) of the user's latest items and
        their validity (B, k), where the privacy mode allows them (see `TwoTower.forward`)."""
        user = self.base(history, recent)
        if self.user_vector is not None:
            if users is None:
                users = torch.zeros(history.shape[0], dtype=torch.long, device=history.device)
            user = user + self.user_vector(users)
        return F.normalize(user, dim=-1)


class TwoTower(nn.Module):
    def __init__(
        self,
        content: Mapping[str, torch.Tensor],
        content_mask: torch.Tensor,
        n_catalogue: int,
        dim: int = 64,
        id_embeddings: bool = True,
        private_vector: bool = True,
        logit_scale: float = 10.0,
        n_users: int = 1,
        item_bias: bool = True,
        recent_items: int = 0,
        history_rows: torch.Tensor | None = None,
    ) -> None:
        """`history_rows`: `history_features(content, content_mask)`, when the caller has it already."""
        super().__init__()
        self.items = ItemTower(content, content_mask, n_catalogue, dim, id_embeddings, item_bias)
        self.users = UserTower(history_dim(content), dim, private_vector, n_users, recent_items)
        if history_rows is None:
            history_rows = history_features(content, content_mask)
        self.register_buffer("history_rows", history_rows, persistent=False)
        self.logit_scale = logit_scale

    def forward(
        self,
        history: torch.Tensor,
        candidates: torch.Tensor,
        id_keep: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
        leave_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (B, C) of candidate items (B, C) for users given by history sums (B, H).
        `id_keep` (B,) bool drops the ID embeddings of an example's candidates where False.
        `leave_out` (B,) an item each example's history drops (its own target, in training).
        `recent` (B, K) item indices (-1 = padding) of the items just before each example: their item
        vectors join the user vector. It couples examples of the same user, so record-level DP-SGD never
        passes it (its sensitivity would not be the clip norm); without DP or under user-level DP it may."""
        user = self.user_vectors(history, users, recent, leave_out)
        keep = None if id_keep is None else id_keep.unsqueeze(-1).expand_as(candidates)
        item = self.items(candidates, keep)
        return self.logit_scale * torch.einsum("bd,bcd->bc", user, item) + self.items.offset(candidates, keep)

    def user_vectors(
        self,
        history: torch.Tensor,
        users: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
        leave_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        history, context = self._user_inputs(history, recent, leave_out)
        return self.users(history, users, context)

    def user_base(
        self, history: torch.Tensor, recent: torch.Tensor | None = None, leave_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`UserTower.base` for the arguments of `user_vectors`: what the private vector is added to."""
        history, context = self._user_inputs(history, recent, leave_out)
        return self.users.base(history, context)

    def _user_inputs(self, history, recent, leave_out):
        if leave_out is not None:
            history = history - self.history_rows[leave_out]
        context = None
        if recent is not None and self.users.recent_weights is not None:
            context = (self.items(recent.clamp(min=0)), (recent >= 0).float())
        return F.normalize(history, dim=-1), context

    @torch.no_grad()
    def score_all(
        self,
        history: torch.Tensor,
        use_ids: bool = True,
        users: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (B, n_items) of every item for each history sum (B, H)."""
        user = self.user_vectors(history, users, recent)
        all_items = torch.arange(self.items.n_items)
        keep = None if use_ids else torch.zeros_like(all_items, dtype=torch.bool)
        return self.logit_scale * user @ self.items(all_items, keep).T + self.items.offset(all_items, keep)


def build_model(content, n_catalogue: int, cfg, n_users: int = 1) -> TwoTower:
    """The two towers for an `ItemContent` and a `RunConfig`, as devices, server and baselines build them
    (`n_users` private vectors: one on a device, one per user in central training)."""
    model = TwoTower(
        content.features,
        content.mask,
        n_catalogue,
        cfg.embedding_dim,
        id_embeddings=cfg.use_id_embeddings,
        private_vector=cfg.private_user_vector,
        logit_scale=cfg.logit_scale,
        item_bias=cfg.item_bias,
        n_users=n_users,
        recent_items=cfg.recent_items,
        history_rows=content.history_rows,
    )
    if model.users.recent_weights is not None and not cfg.train_recent:
        # Record-level DP: the recent items join the user vector only when the device serves, with the
        # initial equal weights (training them would need the coupled examples DP-SGD cannot take).
        model.users.recent_weights.requires_grad_(False)
    return model


def recent_contexts(sequence: np.ndarray, k: int) -> torch.Tensor:
    """(len(sequence) + 1, k): row i holds the k items before position i (left-padded with -1); the last
    row, the k most recent items, is the context for ranking what comes next."""
    padded = np.concatenate([np.full(k, -1, dtype=np.int64), np.asarray(sequence, dtype=np.int64)])
    rows = [padded[i : i + k] for i in range(len(sequence) + 1)]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def evaluation_inputs(
    history: torch.Tensor, rows: torch.Tensor, train: np.ndarray, val: int, k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """History sums (2, H) and recent contexts (2, k) (None when k = 0) for ranking the validation item
    (row 0: the training history) and the test item (row 1: the validation item joins the history and
    becomes the latest item, since the user had it by then). `history` is the training history's sum."""
    histories = torch.stack([history.reshape(-1), history.reshape(-1) + rows[val]])
    if not k:
        return histories, None
    recent = torch.cat([recent_contexts(train, k)[-1:], recent_contexts(np.append(train, val), k)[-1:]])
    return histories, recent


def history_dim(content: Mapping[str, torch.Tensor]) -> int:
    return sum(v.shape[1] for v in content.values())


def history_features(content: Mapping[str, torch.Tensor], content_mask: torch.Tensor) -> torch.Tensor:
    """Per-item vectors whose sums summarise a history: each modality L2-normalised and scaled by
    1/sqrt(n_modalities), concatenated, so every item row has L2 norm at most 1 (the sensitivity of a
    history sum to adding or removing one interaction)."""
    scale = 1.0 / len(content) ** 0.5
    parts = [
        F.normalize(v.float(), dim=-1) * scale * content_mask[:, i : i + 1]
        for i, v in enumerate(content.values())
    ]
    return torch.cat(parts, dim=-1)


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that are federated: everything except the private user vector."""
    return {k: v for k, v in model.state_dict().items() if not is_private(k)}


def private_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_private(k)}


def is_private(name: str) -> bool:
    return f".{PRIVATE_PREFIX}" in f".{name}"
