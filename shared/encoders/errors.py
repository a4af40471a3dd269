"""Errors every on-device encoder raises, and the per-modality tally of media that failed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shared.errors import UserError


class MissingWeightsError(UserError, RuntimeError):
    """A pretrained encoder's weights are not installed on this device."""


class MediaError(ValueError):
    """One item's media file could not be decoded (truncated, wrong codec, empty, not an image...).

    The item keeps its other modalities; the failure is counted in a `FailureTally`.
    """


@dataclass
class FailureTally:
    """What failed, per modality: counts and the first few messages (path and reason)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep: int = 5

    def add(self, modality: str, message: str, n: int = 1) -> None:
        self.counts[modality] += n
        shown = self.examples.setdefault(modality, [])
        if len(shown) < self.keep:
            shown.append(message)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"failed": dict(self.counts), "examples": self.examples}
