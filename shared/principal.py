"""Public item content reduced to its leading principal components (`content-dim`).

The catalogue's content (titles, posters, audio, ...) is public, so every device and the server can
compute the same reduction from it at no privacy cost. Fewer input dimensions mean a smaller item tower
and history projection: fewer coordinates for DP noise (and for a secure sum's shares) and less compute
per training step. The computation is deterministic (float64 SVD, each component's sign fixed by its
largest coordinate), so devices that hold the same catalogue build the same model.
"""

from __future__ import annotations

import numpy as np


def principal_components(features: np.ndarray, present: np.ndarray, k: int) -> np.ndarray:
    """(n_items, min(k, d)): the present rows centred and projected on their top-k principal directions;
    absent rows (all zero) stay zero, so the modality mask is unchanged. Widths already <= k are kept."""
    x = np.asarray(features, dtype=np.float64)
    if k < 1:
        raise ValueError(f"content-dim = {k}: expected a positive number of components (0 turns the reduction off)")
    if x.shape[1] <= k:
        return np.asarray(features, dtype=np.float32)
    rows = x[present]
    out = np.zeros((x.shape[0], k), dtype=np.float32)
    if len(rows) == 0:
        return out
    centred = rows - rows.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = np.zeros((k, x.shape[1]))
    basis[: min(k, len(vt))] = vt[:k]
    signs = np.sign(basis[np.arange(k), np.abs(basis).argmax(axis=1)])
    basis *= np.where(signs == 0, 1.0, signs)[:, None]
    projected = centred @ basis.T
    # A present item must stay present (the mask is derived from non-zero rows downstream).
    projected[np.all(projected == 0, axis=1), 0] = np.finfo(np.float32).tiny
    out[present] = projected
    return out
