"""What a device keeps on its own disk across rounds and runs: its record-level privacy ledger, its
private user vector and its released history summary. None of it is ever sent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.privacy.ledger import PrivacyLedger


class DeviceState:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ledger = PrivacyLedger(self.root / "privacy-ledger.jsonl", level="record")

    @property
    def _private_path(self) -> Path:
        return self.root / "private.safetensors"

    def load_private(self) -> dict[str, torch.Tensor]:
        """The private tensors saved last round (user vector, history release), or {} on first use."""
        if not self._private_path.exists():
            return {}
        return load_file(self._private_path)

    def save_private(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, self._private_path)  # a crash mid-write keeps last round's state
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def private_metadata(self) -> dict[str, str]:
        if not self._private_path.exists():
            return {}
        from safetensors import safe_open

        with safe_open(self._private_path, "pt") as handle:
            return dict(handle.metadata() or {})
