"""Poisson sampling for DP-SGD drawn from the OS CSPRNG.

Opacus's own sampler draws its Poisson mask from a torch generator (Mersenne Twister): unpredictable
only as far as its seed is, and not a cryptographically secure source. Amplification by sampling is
claimed only for sampling that is random, independent of the data, and drawn from a CSPRNG, so each
example joins each step independently with probability `sample_rate` drawn by `secrets.SystemRandom`.
"""

from __future__ import annotations

import secrets

from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

SOURCE = "secrets.SystemRandom (OS CSPRNG)"


class CsprngPoissonSampler(UniformWithReplacementSampler):
    """Opacus's UniformWithReplacementSampler (same rate and step count), its mask drawn from the OS CSPRNG."""

    def __iter__(self):
        rng = secrets.SystemRandom()
        for _ in range(self.steps):
            yield [i for i in range(self.num_samples) if rng.random() < self.sample_rate]


def csprng_loader(dp_loader: DataLoader, sample_rate: float, steps: int) -> DataLoader:
    """Opacus's DPDataLoader batches (its empty-batch collate included), Poisson-sampled by the CSPRNG at
    the given rate for the given number of steps (both independent of the data)."""
    return DataLoader(
        dp_loader.dataset,
        batch_sampler=CsprngPoissonSampler(num_samples=len(dp_loader.dataset), sample_rate=sample_rate, steps=steps),
        collate_fn=dp_loader.collate_fn,
    )
