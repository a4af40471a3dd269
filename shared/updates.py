"""Model updates as they travel: norms, clipping, and the checks a server runs before it trusts one."""

from __future__ import annotations

import math
from typing import Mapping

import torch


class UpdateError(ValueError):
    """An update that must not be aggregated (wrong keys or shapes, NaN or infinite values, too large)."""


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over every tensor of the update."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Scale the whole update down to L2 norm `max_norm` if it is longer (DP-FedAvg's clipping)."""
    norm = update_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in update.items()}


def check_update(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
    source: str = "client",
) -> None:
    """Raise UpdateError unless `update` has exactly the reference's keys and shapes, is finite, and
    (when `max_norm` is given) is no longer than it."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateError(
            f"update from {source}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}; "
            "the client probably runs a different model configuration than the server"
        )
    for name, ref in reference.items():
        value = update[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise UpdateError(
                f"update from {source}: {name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}; "
                "the client's catalogue or embedding size differs from the server's"
            )
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UpdateError(f"update from {source}: {name} has {bad} NaN or infinite values (diverged training?)")
    if max_norm is not None:
        norm = update_norm(update)
        if norm > max_norm * (1 + 1e-4):
            raise UpdateError(
                f"update from {source}: L2 norm {norm:.6g} exceeds the clip norm {max_norm}; "
                "the client did not clip its update as user-level DP requires"
            )
