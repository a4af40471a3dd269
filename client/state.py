"""What a device keeps on its own disk across rounds and runs: its record-level privacy ledger (signed with
the device's own Ed25519 key, kept here with owner-only permissions), its private user vector and its
released history summary. None of it is ever sent, except the ledger's signed head (entry count and last
hash), which lets an auditor detect a ledger rolled back later."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.privacy.device_heads import DEVICE_LEDGER
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.signing import load_or_create_key


class DeviceState:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ledger = PrivacyLedger(self.root / DEVICE_LEDGER, level="record",
                                    signer=load_or_create_key(self.root))

    def ledger_head(self) -> dict | None:
        """The ledger's signed head, or None before the first entry."""
        return self.ledger.head() if self.ledger.head_path.exists() else None

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
