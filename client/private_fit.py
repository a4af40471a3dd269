"""The private user vector solved on the device for the shared weights it holds.

Under user-level DP the shared towers a device receives carry the noise of every round so far, and what
ranks is the private vector (README, "Results"). Trained jointly with the shared weights for one local
epoch, that vector follows the device's own locally moved copy of the towers, not the weights the device
then ranks with. Here only the private vector moves: full-batch L-BFGS on the softmax over the whole
catalogue, the shared weights fixed, from the vector the device held. It is the user half of alternating
least squares (Private ALS: user state solved exactly on the device and never released).

Privacy: the vector never leaves the device. Under user-level DP the whole of a user's data is the unit,
so the update trained from this vector is still bounded by the device's clip. Under record-level DP the
fitted vector depends on every record at once, which DP-SGD's per-example clip does not cover: it is used
only to rank on the device, never as a starting point for training (`client.device.Device.train_round`).

Deterministic (no sampling), so the batched cohort (simulations/cohort.py) gets the same vector by calling
this for each device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from shared.model import TwoTower, recent_contexts


def fit_private(
    model: TwoTower,
    train_items: np.ndarray,
    history: torch.Tensor,
    start: torch.Tensor,
    steps: int,
    recent_items: int,
    weights: np.ndarray | None = None,
) -> torch.Tensor:
    """The private vector (1, dim) that `steps` L-BFGS iterations from `start` reach on the weighted softmax
    loss of the user's training items (time order, `weights` aligned with them, None = 1 each) under the
    model's shared weights; each item is predicted from the history without it and the `recent_items`
    before it, as in training. `history` is the training history's sum (H,)."""
    targets = torch.as_tensor(np.array(train_items, dtype=np.int64))
    if steps <= 0 or targets.numel() == 0:
        return start.clone()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        everything = torch.arange(model.items.n_items)
        items, offsets = model.items(everything), model.items.offset(everything)
        recent = recent_contexts(train_items, recent_items)[:-1] if recent_items else None
        base = model.user_base(history.reshape(1, -1).float().expand(targets.shape[0], -1), recent, targets)
    example_weights = torch.ones(targets.shape[0]) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    total = example_weights.sum()
    if total <= 0:
        model.train(was_training)
        return start.clone()
    vector = start.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.LBFGS([vector], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = model.logit_scale * F.normalize(base + vector, dim=-1) @ items.T + offsets
        value = (F.cross_entropy(logits, targets, reduction="none") * example_weights).sum() / total
        value.backward()
        return value

    optimizer.step(loss)
    model.train(was_training)
    return vector.detach()
