"""Many simulated devices' rounds at once: the in-process engine's fast path (simulations/inprocess.py).

Each device's round is what `client.device.Device.train_round` computes (same starting weights, same
private vector, the same random draws from the same per-device generator, the same SGD steps, the same
clipping and reply), but the local steps of a whole cohort run as one batched computation: `torch.func`
takes each device's gradient with its own copy of the weights (`vmap` over devices), since weights diverge
after the first step. Devices are ordered by their number of steps, so at step t the devices still
training are a prefix of the stack and are updated in place. `tests/test_inprocess.py` checks that every
device's update, private vector and evaluation equal those of `Device.train_round`.

Only rounds without record-level DP take this path: DP-SGD runs through Opacus on each device
(`Device.train_round`), which the in-process engine then calls device by device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap

from client.device import Device, Reply
from client.history import release_history
from client.trainer import WeightedCrossEntropy, example_draws, example_loader
from shared.metrics import user_metrics
from shared.model import PRIVATE_KEY, build_model, evaluation_inputs, is_private, shared_state

COHORT = 128  # devices whose stacked weights and activations are held at once (about 1 GB at ML-100K's size)


def vectorised(cfg) -> bool:
    """Whether a round under `cfg` can take the batched path (not under record-level DP: see top)."""
    return not cfg.record_dp


@dataclass
class _Plan:
    """One device's round, drawn ahead: its batches in training order."""

    device: Device
    history: torch.Tensor  # (H,) the exact history sum (no release noise without record-level DP)
    private: dict[str, torch.Tensor]
    batches: list[tuple[torch.Tensor, ...]]  # (targets, weights, candidates, keep[, recent]) per step


def _plan(device: Device, template, server_round: int) -> _Plan:
    cfg = device.cfg
    saved = device.state.load_private()
    history = release_history(device.content.history_rows, device.split.train, 0.0, torch.Generator())
    # The draws train_local makes, in its order: the loader's shuffle at each epoch's start, then each
    # batch's candidates and ID dropout, from the generator Device.train_round seeds.
    generator = torch.Generator().manual_seed(device.round_seed(server_round))
    split = device.split
    loader = example_loader(split.train, split.weights, cfg, generator)
    dislikes = torch.as_tensor(split.dislikes, dtype=torch.long)
    batches = []
    for _ in range(cfg.local_epochs):
        for targets, weights, *context in loader:
            draws = example_draws(targets, template.items.n_items, cfg, generator, dislikes)
            batches.append((targets, weights, *draws, *context))
    return _Plan(device, history, device.private_start(template, saved), batches)


def _stack_step(plans: Sequence[_Plan], step: int, width: int) -> tuple[torch.Tensor, ...]:
    """Step `step` of every plan, padded to `width` examples; the mask marks real ones."""
    columns: list[list[torch.Tensor]] = []
    masks = []
    for plan in plans:
        batch = plan.batches[step]
        pad = width - batch[0].shape[0]
        padded = [torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) if pad else t for t in batch]
        for i, t in enumerate(padded):
            if i == len(columns):
                columns.append([])
            columns[i].append(t)
        masks.append(torch.arange(width) < batch[0].shape[0])
    return (*(torch.stack(c) for c in columns), torch.stack(masks).float())


def train_cohort(devices: Sequence[Device], global_state: dict[str, torch.Tensor], server_round: int,
                 progress: Callable[[int], None] | None = None, run_id: str = "") -> list[Reply]:
    """Each device's `Reply` for this round, as `Device.train_round` would give it; also saves each device's
    private state as it does. `progress(devices done)` is called after each cohort."""
    if not devices:
        return []
    cfg = devices[0].cfg
    if not vectorised(cfg):
        raise ValueError("train_cohort: record-level DP trains through Opacus on each device (Device.train_round)")
    replies: dict[int, Reply] = {}
    for start in range(0, len(devices), COHORT):
        chunk = list(devices[start:start + COHORT])
        for i, reply in zip(range(start, start + len(chunk)), _train_chunk(chunk, global_state, server_round, run_id)):
            replies[i] = reply
        if progress:
            progress(len(replies))
    return [replies[i] for i in range(len(devices))]


def _train_chunk(devices: list[Device], global_state: dict[str, torch.Tensor], server_round: int,
                 run_id: str) -> list[Reply]:
    cfg, content = devices[0].cfg, devices[0].content
    template = build_model(content, devices[0].n_catalogue, cfg)
    plans = [_plan(d, template, server_round) for d in devices]
    order = sorted(range(len(plans)), key=lambda i: -len(plans[i].batches))
    plans = [plans[i] for i in order]
    fitted = _fit_private(plans, global_state) if cfg.fits_private else None

    names = {n for n, p in template.named_parameters() if p.requires_grad}
    frozen = {**{n: p.detach() for n, p in template.named_parameters() if n not in names},
              **dict(template.named_buffers())}
    frozen.update({n: v for n, v in global_state.items() if n not in names})
    weights = {n: (torch.stack([p.private[n] for p in plans]) if is_private(n)
                   else global_state[n].unsqueeze(0).repeat(len(plans), *[1] * global_state[n].dim())).clone()
               for n in names}
    rates = {n: cfg.private_learning_rate if is_private(n) else cfg.learning_rate for n in names}

    def loss(trainable, history, targets, example_weights, candidates, keep, *rest):
        *recent, mask = rest
        logits = functional_call(
            template, {**frozen, **trainable},
            (history.expand(targets.shape[0], -1), candidates, keep, None, recent[0] if recent else None),
            {"leave_out": targets},
        )
        return (per_example_loss(logits, example_weights) * mask).sum() / mask.sum()

    per_example_loss = WeightedCrossEntropy(reduction="none")
    step_fn = vmap(grad_and_value(loss))
    histories = torch.stack([p.history for p in plans]).float()
    losses = torch.zeros(len(plans), dtype=torch.float64)
    seen = torch.zeros(len(plans), dtype=torch.float64)
    template.train()
    for step in range(len(plans[0].batches) if plans else 0):
        m = sum(1 for p in plans if len(p.batches) > step)  # a prefix: plans are sorted by step count
        batch = _stack_step(plans[:m], step, cfg.batch_size)
        grads, values = step_fn({n: w[:m] for n, w in weights.items()}, histories[:m], *batch)
        with torch.no_grad():
            for n in names:
                weights[n][:m].add_(grads[n], alpha=-rates[n])  # what torch.optim.SGD does (no momentum)
        count = batch[-1].sum(1).double()
        losses[:m] += values.detach().double() * count
        seen[:m] += count

    # Each device ranks with the global weights and its freshly trained, or fitted, private vector
    # (Device.train_round).
    private_names = sorted(n for n in names if is_private(n))
    evaluations = _evaluate(plans, template, global_state, fitted or {n: weights[n] for n in private_names})
    replies = []
    for i, plan in enumerate(plans):
        private = {n: weights[n][i].clone() for n in private_names}
        plan.device.state.save_private({**private, "history": plan.history},
                                       plan.device.release_metadata(server_round, run_id))
        delta = {n: (weights[n][i] if n in names else v) - v for n, v in global_state.items()}
        loss_value = float(losses[i] / seen[i]) if seen[i] else 0.0
        replies.append(plan.device.reply(delta, {**evaluations[i], "train-loss": loss_value}))
    unsorted: list[Reply] = [None] * len(plans)  # type: ignore[list-item]
    for position, original in enumerate(order):
        unsorted[original] = replies[position]
    return unsorted


def _fit_private(plans: list[_Plan], global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each plan's private vector fitted to the global weights (`Device.fit_private`), made its starting point;
    returns them stacked by name, as `_evaluate` takes them."""
    device = plans[0].device
    model = build_model(device.content, device.n_catalogue, device.cfg)
    model.load_state_dict({**model.state_dict(), **global_state})
    for plan in plans:
        model.load_state_dict(plan.private, strict=False)
        plan.private = {PRIVATE_KEY: plan.device.fit_private(model, plan.history)}
    return {PRIVATE_KEY: torch.stack([plan.private[PRIVATE_KEY] for plan in plans])}


@torch.no_grad()
def _evaluate(plans: list[_Plan], template, global_state, private: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """`Device.evaluate` for every plan at once: one model holding each device's private vector as a row."""
    cfg, content = plans[0].device.cfg, plans[0].device.content
    model = build_model(content, plans[0].device.n_catalogue, cfg, n_users=len(plans))
    rows = {n: w.reshape(len(plans), -1) for n, w in private.items()}
    model.load_state_dict({**global_state, **rows}, strict=True)
    model.eval()
    histories, recents = [], []
    for plan in plans:
        s = plan.device.split
        h, r = evaluation_inputs(plan.history, model.history_rows, s.train, s.val, cfg.recent_items)
        histories.append(h)
        recents.append(r)
    users = torch.arange(len(plans)).repeat_interleave(2)
    recent = torch.cat(recents) if recents[0] is not None else None
    scores = model.score_all(torch.cat(histories), users=users, recent=recent).numpy()
    out = []
    for i, plan in enumerate(plans):
        s = plan.device.split
        out.append(user_metrics(scores[2 * i], s.train, s.val, s.test, s.val_negatives, s.test_negatives, scores[2 * i + 1]))
    return out
