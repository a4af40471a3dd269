"""The user's history summary, released on a fixed schedule with the Gaussian mechanism.

The user tower reads the history as the sum of the history items' content rows (`history_features`,
each of L2 norm at most 1). Adding or removing one interaction moves that sum by at most 1, so Gaussian
noise of std `sigma` makes the release (sigma)-Gaussian-DP at record level; everything trained from it
afterwards is post-processing. A training example subtracts its own target's row from the released sum
(leave-one-out): a function of the release and of that example alone, so DP-SGD's per-example
sensitivity is unchanged, even when the example is newer than the release. The release is kept on the
device and reused on a schedule fixed by the configuration (`history-refresh-rounds`), never by whether
the history changed, and charged to the privacy ledger each time it is made.
"""

from __future__ import annotations

import numpy as np
import torch


def release_history(
    item_rows: torch.Tensor, train_items: np.ndarray, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """The sum of the history items' rows, noised when sigma > 0."""
    total = item_rows[torch.as_tensor(np.asarray(train_items), dtype=torch.long)].sum(0)
    if sigma > 0:
        total = total + sigma * torch.randn(total.shape, generator=generator)
    return total
