"""Item content features: the frozen per-modality embeddings the item tower projects.

Computed on the device from the dataset (text through the MiniLM encoder, cached on disk) or read from
the dataset's precomputed `features/<modality>-<name>.npy` files. Each modality becomes one input of the
item tower's fusion; an item that lacks a modality (an all-zero row) is marked absent in the mask.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.data.dataset import Dataset, load_dataset
from shared.encoders.cache import EmbeddingCache

COMPUTED = {"text"}  # modalities with an on-device encoder; others come from features/ files


@dataclass(frozen=True)
class ItemContent:
    features: dict[str, torch.Tensor]  # name -> (n_items, dim) float32
    mask: torch.Tensor  # (n_items, n_modalities) 1.0 where the item has that modality
    computed: int  # vectors computed in this call (0 when everything came from the cache)
    seconds: float


def text_features(dataset: Dataset, cache: EmbeddingCache) -> tuple[np.ndarray, int]:
    from shared.encoders import text

    texts = dataset.item_texts()
    encoder: list[text.TextEncoder] = []

    def compute(indices: list[int]) -> np.ndarray:
        if not encoder:
            encoder.append(text.TextEncoder())
        return encoder[0].encode([texts[i] for i in indices])

    return cache.embed_all(text.encoder_id(), [t.encode() for t in texts], compute)


def item_content(dataset: Dataset, modalities: list[str], cache_dir: str | Path | None = None) -> ItemContent:
    """Features for the requested modalities: computed ones, then every matching features/ file."""
    start = time.perf_counter()
    cache = EmbeddingCache(cache_dir)
    features: dict[str, np.ndarray] = {}
    computed = 0
    files = dataset.feature_files()
    for modality in modalities:
        if modality == "text":
            features["text"], computed = text_features(dataset, cache)
        for name in sorted(files):
            if name.split("-", 1)[0] == modality:
                features[name] = dataset.load_features(name)
        if not any(k == modality or k.startswith(f"{modality}-") for k in features):
            raise ValueError(
                f"modality {modality!r} was requested but this device has no encoder for it and the "
                f"dataset {dataset.root} has no features/{modality}-<name>.npy file; "
                f"on-device encoders exist for: {', '.join(sorted(COMPUTED))}"
            )
    mask = np.stack([np.abs(v).sum(axis=1) > 0 for v in features.values()], axis=1)
    return ItemContent(
        {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in features.items()},
        torch.from_numpy(mask.astype(np.float32)),
        computed,
        time.perf_counter() - start,
    )


@functools.lru_cache(maxsize=2)
def load_cached(dataset_dir: str, modalities: str, cache_dir: str) -> tuple[Dataset, ItemContent]:
    """The dataset and its item content, loaded once per process (simulated devices share a process)."""
    dataset = load_dataset(dataset_dir)
    content = item_content(dataset, [m for m in modalities.split(",") if m], cache_dir or None)
    return dataset, content


def catalogue_shapes(dataset_dir: str | Path, modalities: list[str]) -> tuple[int, dict[str, int]]:
    """Item count and per-modality content widths, read from the catalogue alone (`items.csv` and the
    headers of `features/*.npy`): what a server needs to build the model without seeing interactions."""
    import pandas as pd

    root = Path(dataset_dir)
    n_items = len(pd.read_csv(root / "items.csv", usecols=["item_id"], dtype=str))
    dims: dict[str, int] = {}
    files = sorted((root / "features").glob("*.npy")) if (root / "features").is_dir() else []
    for modality in modalities:
        if modality == "text":
            from shared.encoders.text import TextEncoder

            dims["text"] = TextEncoder.dim
        for path in files:
            if path.stem.split("-", 1)[0] == modality:
                dims[path.stem] = int(np.load(path, mmap_mode="r").shape[1])
    return n_items, dims


def placeholder_content(n_items: int, dims: dict[str, int]) -> ItemContent:
    """Zero content of the right shapes: enough to build and aggregate the model, never to score."""
    features = {k: torch.zeros(n_items, d) for k, d in dims.items()}
    return ItemContent(features, torch.ones(n_items, len(dims)), 0, 0.0)
