"""Content-addressed on-device embedding cache.

Each vector is stored under sha256(encoder id, weights version, content): a changed title, a changed
file or new weights give a new key, and a second run over the same items computes nothing. Writes go to
a temporary file that is renamed into place, so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shared.paths import default_cache_dir


def content_key(encoder_id: str, content: bytes) -> str:
    return hashlib.sha256(encoder_id.encode() + b"\0" + content).hexdigest()


class EmbeddingCache:
    """One `.npy` file per (encoder, content) under `root/embeddings/<key[:2]>/<key>.npy`."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root or default_cache_dir()) / "embeddings"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            # A damaged entry is recomputed rather than trusted.
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, vector: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, np.asarray(vector, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def embed_all(
        self,
        encoder_id: str,
        contents: Sequence[bytes],
        compute: Callable[[list[int]], np.ndarray],
    ) -> tuple[np.ndarray, int]:
        """Vectors for every content, computing (via `compute(indices)`) only the missing ones.

        Returns the (n, dim) float32 matrix and how many vectors were computed.
        """
        keys = [content_key(encoder_id, c) for c in contents]
        found = [self.get(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:
            computed = compute(missing)
            for i, vector in zip(missing, computed):
                self.put(keys[i], vector)
                found[i] = np.asarray(vector, dtype=np.float32)
        return np.stack(found).astype(np.float32), len(missing)
