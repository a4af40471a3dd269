"""Local training on one device: plain SGD, or DP-SGD through Opacus.

One training example is one interaction of the user: (target item, sampled negatives). The loss is a
softmax over the target and its own negatives. Two choices keep each example's gradient a function of
that example alone, which is what DP-SGD's sensitivity bound (the clip norm) assumes:
- negatives are drawn uniformly from the whole catalogue (never from "items the user has not seen", a
  pool that depends on the user's other records) and never from the batch (in-batch negatives couple
  examples: NOTES.md section 4);
- the user's history enters only as a summary released once with Gaussian noise (`client.history`).
Behaviour signals (`shared.data.signals`) weight each example by at most 1: under DP-SGD the weight scales
its clipped gradient (so the clip norm still bounds it), otherwise its loss; a dislike drawn as a negative couples records and never runs under record-level DP.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.sampling import csprng_loader
from shared.config import RunConfig
from shared.model import TwoTower, is_private, recent_contexts


@dataclass(frozen=True)
class TrainResult:
    examples: int  # stays on the device: the ledger never records it
    steps: int
    sample_rate: float  # Poisson sampling rate of DP-SGD (record-sample-rate), 0 without DP
    noise_multiplier: float  # 0 without DP
    loss: float


def sample_candidates(
    targets: torch.Tensor, n_items: int, n_negatives: int, generator: torch.Generator
) -> torch.Tensor:
    """(B, 1 + K): each example's target then K negatives drawn uniformly from the other items."""
    draws = torch.randint(0, n_items - 1, (targets.shape[0], n_negatives), generator=generator)
    negatives = draws + (draws >= targets.unsqueeze(1)).long()  # skip the target, stay uniform
    return torch.cat([targets.unsqueeze(1), negatives], dim=1)


def example_draws(
    targets: torch.Tensor, n_items: int, cfg: RunConfig, generator: torch.Generator,
    dislikes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's random draws, in the order training makes them: candidates (B, 1 + K) and which examples
    keep their ID embeddings (B,). Also replayed by the vectorised cohort trainer (simulations/cohort.py).
    With `cfg.dislike-negatives` = d and a user who disliked something, the first d negatives are drawn from
    `dislikes` (the user's own, never a positive) instead (the shape stays the same for every user)."""
    candidates = sample_candidates(targets, n_items, cfg.num_negatives, generator)
    if cfg.dislike_negatives and dislikes is not None and len(dislikes):
        picks = torch.randint(0, len(dislikes), (targets.shape[0], cfg.dislike_negatives), generator=generator)
        candidates[:, 1:1 + cfg.dislike_negatives] = dislikes[picks]
    return candidates, torch.rand(targets.shape[0], generator=generator) >= cfg.id_dropout


def example_logits(
    model: nn.Module,
    history: torch.Tensor,
    targets: torch.Tensor,
    n_items: int,
    cfg: RunConfig,
    generator: torch.Generator,
    users: torch.Tensor | None = None,
    recent: torch.Tensor | None = None,
    dislikes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, 1 + K) with the positive in column 0; negatives and ID dropout drawn per example.
    `history` is the history sum, (B, H) or (1, H) for one user: each example leaves its own target out.
    `users` indexes private vectors in central training; `recent` (B, k) holds the items before each
    target (only where `cfg.train_recent`); `dislikes` the one user's disliked items (see `example_draws`)."""
    candidates, keep = example_draws(targets, n_items, cfg, generator, dislikes)
    return model(history.expand(targets.shape[0], -1), candidates, keep, users, recent, leave_out=targets)


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    shared = [p for n, p in model.named_parameters() if not is_private(n) and p.requires_grad]
    private = [p for n, p in model.named_parameters() if is_private(n) and p.requires_grad]
    groups = [{"params": shared, "lr": cfg.learning_rate}]
    if private:
        groups.append({"params": private, "lr": cfg.private_learning_rate})
    return torch.optim.SGD(groups, lr=cfg.learning_rate)


class WeightedCrossEntropy(nn.Module):
    """Softmax cross-entropy with the positive in column 0, each example's loss times its weight (<= 1, so an
    example's gradient is at most its unweighted one, and clipping bounds it as before). `reduction` is what
    Opacus's ghost clipping sets to "none" to take the per-example losses."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        per_example = nn.functional.cross_entropy(logits, target, reduction="none") * weights
        return per_example if self.reduction == "none" else per_example.mean()


def example_loader(train_items: np.ndarray, weights: np.ndarray | None, cfg: RunConfig,
                   generator: torch.Generator) -> DataLoader:
    """Shuffled mini-batches of (targets, weights[, the recent items before each]): one example per train item,
    `weights` aligned with them (None = 1 each). A weight-0 item (a dislike, or an event weighted 0) stays an
    example whose loss is 0: the examples, the batches and DP-SGD's records are the same whatever the signals."""
    train_items = np.asarray(train_items)
    weights = np.ones(len(train_items)) if weights is None else np.asarray(weights)
    tensors = [torch.as_tensor(train_items, dtype=torch.long), torch.as_tensor(weights, dtype=torch.float32)]
    if cfg.train_recent:  # never under record-level DP (see shared.model.TwoTower.forward)
        tensors.append(recent_contexts(train_items, cfg.recent_items)[:-1])
    return DataLoader(TensorDataset(*tensors), batch_size=cfg.batch_size, shuffle=True, generator=generator)


def train_local(
    model: TwoTower,
    train_items: np.ndarray,
    history: torch.Tensor,
    cfg: RunConfig,
    seed: int,
    dp: bool,
    after_backward=None,
    weights: np.ndarray | None = None,
    dislikes: np.ndarray | None = None,
) -> TrainResult:
    """Train `model` in place on the user's training interactions: `cfg.local_epochs` epochs of
    shuffled mini-batches, or under DP-SGD `cfg.record_steps` steps, each Poisson-sampling every
    interaction at `cfg.record_sample_rate` and dividing its summed clipped gradients plus noise by the
    fixed `cfg.batch_size`. Rate, steps and divisor are the same for every user, so the noise the update
    carries says nothing about how many interactions the user has.

    `after_backward(optimizer)`, if given, runs between each backward pass and optimizer step: the
    empirical privacy audit (`shared.privacy.empirical`) injects its canary gradients there. `weights` (aligned
    with `train_items`, each in [0, 1]) and `dislikes` are the user's behaviour signals (`UserSplit`)."""
    if dp and cfg.dislike_negatives and dislikes is not None and len(dislikes):
        raise ValueError("train_local: dislikes as negatives couple records; refused under record-level DP")
    n_items = model.items.n_items
    targets = torch.as_tensor(np.asarray(train_items), dtype=torch.long)
    n = int(targets.shape[0])
    generator = torch.Generator().manual_seed(seed)
    history = history.reshape(1, -1).float()
    loader = example_loader(train_items, weights, cfg, generator)
    disliked = None if dislikes is None else torch.as_tensor(np.asarray(dislikes), dtype=torch.long)
    model.train()
    optimizer = _optimizer(model, cfg)
    criterion: nn.Module = WeightedCrossEntropy()
    sample_rate, sigma = 0.0, 0.0
    epochs = cfg.local_epochs
    if dp:
        from opacus import PrivacyEngine

        sample_rate, sigma, epochs = cfg.record_sample_rate, cfg.noise_multiplier, 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns that secure_mode is off: stated in the docs
            engine = PrivacyEngine(accountant="prv")
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=cfg.clip_norm,
                poisson_sampling=True,
                grad_sample_mode=cfg.grad_sample_mode,
                noise_generator=torch.Generator().manual_seed(seed + 1),
            )
        if cfg.grad_sample_mode == "ghost":
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
        # Opacus derives the rate (1 / len(loader)), the step count and the divisor (int(n * rate)) from
        # n, which would leak n: replace all three by the configured, data-independent ones.
        optimizer.expected_batch_size = cfg.batch_size
        loader = csprng_loader(loader, sample_rate, cfg.record_steps)
    weigh_after_clip = dp and weights is not None
    steps, total, seen = 0, 0.0, 0
    for _ in range(epochs):
        for batch, batch_weights, *context in loader:
            optimizer.zero_grad(set_to_none=True)
            if batch.numel() == 0:
                # An empty Poisson batch still takes a (noise-only) step, as the accountant assumes.
                if dp:
                    _noise_only_step(optimizer)
                steps += 1
                continue
            recent = context[0] if context else None
            logits = example_logits(model, history, batch, n_items, cfg, generator, None, recent, disliked)
            # Under DP-SGD a weight scales the clipped per-example gradient (weigh_clipped), not the loss: a
            # gradient longer than the clip would otherwise lose its weight to the clip.
            loss = criterion(logits, torch.ones_like(batch_weights) if weigh_after_clip else batch_weights)
            loss.backward()
            if weigh_after_clip:
                weigh_clipped(optimizer, batch_weights, cfg.clip_norm)
            if after_backward is not None:
                after_backward(optimizer)
            optimizer.step()
            steps += 1
            total += float(loss.detach()) * batch.shape[0]
            seen += batch.shape[0]
    if dp:
        model.remove_hooks()  # the wrapped TwoTower lives on; leave it without Opacus hooks
    return TrainResult(n, steps, sample_rate, sigma, total / max(seen, 1))


def weigh_clipped(optimizer, weights: torch.Tensor, clip: float) -> None:
    """Replace each example's per-sample gradient g (Opacus hooks mode) by weight x g clipped to `clip`, with
    Opacus's own clip factor: a weight <= 1 leaves every norm below `clip`, so the optimizer's clip that follows
    changes nothing (beyond its 1e-6 guard) and the summed gradient is sum_i w_i clip(g_i)."""
    params = [p for p in optimizer.params if p.grad_sample is not None]
    norms = torch.stack([p.grad_sample.reshape(len(weights), -1).norm(dim=1) for p in params], dim=1).norm(dim=1)
    factor = weights.to(norms.dtype) * (clip / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad_sample = p.grad_sample * factor.reshape(-1, *([1] * (p.grad_sample.dim() - 1)))


def _noise_only_step(optimizer) -> None:
    """What Opacus's DPOptimizer does for a batch with no examples: the summed clipped gradient is
    zero, so the step is Gaussian noise of std sigma * C, averaged over the expected batch size."""
    std = optimizer.noise_multiplier * optimizer.max_grad_norm
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                noise = torch.normal(0.0, std, p.shape, generator=optimizer.generator)
                p.grad = noise / optimizer.expected_batch_size
    optimizer.original_optimizer.step()

