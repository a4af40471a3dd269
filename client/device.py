"""One device for one user: a round of local training, its privacy bookkeeping, and its evaluation.

Independent of Flower so it can be tested and reused; `client.app` wraps it in a ClientApp.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from client.history import history_key, release_history
from client.sampling import SOURCE as SAMPLING_SOURCE
from client.state import DeviceState
from client.trainer import local_steps, train_local
from shared.config import RunConfig
from shared.data.split import UserSplit
from shared.features import ItemContent
from shared.metrics import user_metrics
from shared.model import (
    TwoTower, build_model, evaluation_inputs, private_state, shared_state,
)
from shared.privacy.accounting import SampledGaussian, epsilon
from shared.updates import clip_update

NEIGHBOURING = "add or remove one interaction of this user"


@dataclass
class Reply:
    delta: dict[str, torch.Tensor] | None  # shared weights after minus before; None if declined
    metrics: dict[str, float] = field(default_factory=dict)
    declined: str = ""


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


class Device:
    def __init__(
        self,
        user_id: str,
        split: UserSplit,
        content: ItemContent,
        n_catalogue: int,
        cfg: RunConfig,
        state_dir: str | Path,
    ) -> None:
        self.user_id = user_id
        self.split = split
        self.content = content
        self.n_catalogue = n_catalogue
        self.cfg = cfg
        self.state = DeviceState(state_dir)

    def _secret_or_seeded(self, server_round: int) -> int:
        # DP noise and Poisson sampling must be unknown to the server, so under record-level DP they are
        # seeded from the OS CSPRNG; without DP the run is reproducible from the config seed.
        if self.cfg.record_dp:
            return secrets.randbits(62)
        return _seed(self.cfg.seed, self.user_id, server_round)

    @property
    def history_sigma(self) -> float:
        return self.cfg.history_noise_multiplier if self.cfg.record_dp else 0.0

    def _release_metadata(self, key: str) -> dict[str, str]:
        # What a saved release must match to be reused: the same history, noise, and form (a sum).
        return {"history-key": key, "history-sigma": repr(self.history_sigma), "history-form": "sum"}

    def _history(self, saved: dict[str, torch.Tensor], key: str, server_round: int):
        """The released history sum, and the ledger event it costs now (None when reused)."""
        meta = self.state.private_metadata()
        if "history" in saved and all(meta.get(k) == v for k, v in self._release_metadata(key).items()):
            return saved["history"], None
        rows = self.content.history_rows
        generator = torch.Generator().manual_seed(self._secret_or_seeded(server_round) + 7)
        released = release_history(rows, self.split.train, self.history_sigma, generator)
        return released, (SampledGaussian(self.history_sigma, 1.0, 1) if self.history_sigma > 0 else None)

    def train_round(self, global_state: dict[str, torch.Tensor], server_round: int) -> Reply:
        cfg = self.cfg
        model = build_model(self.content, self.n_catalogue, cfg)
        saved = self.state.load_private()
        private = {k: v for k, v in saved.items() if k != "history"}
        model.load_state_dict({**private_state(model), **private, **global_state}, strict=True)
        key = history_key(self.split.train)
        history, history_event = self._history(saved, key, server_round)

        n = len(self.split.train)
        new_events = [history_event] if history_event else []
        if cfg.record_dp:
            rate, steps = local_steps(n, cfg)
            new_events.append(SampledGaussian(cfg.noise_multiplier, rate, steps))
            # RDP is an upper bound on the tight epsilon and fast: a device may stop a round early,
            # never late. The reported epsilon is the tight (PLD) value.
            after = epsilon(self.state.ledger.events() + new_events, cfg.delta, accountant="rdp-fast")
            if after > cfg.epsilon_budget:
                # It still reports how the model it serves ranks its held-out items (as every device
                # does; outside the guarantee), so round metrics cover every sampled device. Only a
                # history released before may be used: a new release would cost budget.
                metrics = self.evaluate(model, history) if history_event is None else {}
                return Reply(
                    None,
                    {**metrics, "declined": 1.0},
                    f"user {self.user_id}: round {server_round} would raise record-level epsilon to "
                    f"{after:.3f} (RDP bound, delta {cfg.delta}) over the budget {cfg.epsilon_budget}",
                )
        if history_event:
            self.state.ledger.append(
                level="record", round=server_round, mechanism="gaussian-history-release",
                noise_multiplier=history_event.noise_multiplier, sample_rate=1.0, steps=1,
                clip_norm=1.0, sampling="none", amplification=False, neighbouring=NEIGHBOURING,
                details={"sensitivity": "each history row has L2 norm <= 1"},
            )

        before = {k: v.clone() for k, v in shared_state(model).items()}
        result = train_local(
            model, self.split.train, history, cfg, self._secret_or_seeded(server_round), cfg.record_dp
        )
        if cfg.record_dp:
            self.state.ledger.append(
                level="record", round=server_round, mechanism="dp-sgd",
                noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
                steps=result.steps, clip_norm=cfg.clip_norm, sampling="poisson-csprng", amplification=True,
                neighbouring=NEIGHBOURING,
                details={"examples": result.examples, "grad_sample_mode": cfg.grad_sample_mode,
                         "batch_size": cfg.batch_size, "local_epochs": cfg.local_epochs,
                         "sampling_source": SAMPLING_SOURCE,
                         "noise_source": "torch.Generator seeded with 62 bits from the OS CSPRNG"},
            )
        self.state.save_private(
            {**private_state(model), "history": history}, self._release_metadata(key)
        )

        delta = {k: v - before[k] for k, v in shared_state(model).items()}
        # The device serves the global weights it received with its freshly trained private vector: the
        # shared weights it trained locally carry this round's DP noise, which only averaging removes.
        model.load_state_dict(before, strict=False)
        metrics = self.evaluate(model, history)
        metrics["train-loss"] = result.loss
        metrics["declined"] = 0.0
        if cfg.user_dp:
            # Clipped on the device, so the same update works under secure aggregation.
            delta = clip_update(delta, cfg.user_clip_norm)
        return Reply(delta, metrics)

    @torch.no_grad()
    def evaluate(self, model: TwoTower, history: torch.Tensor) -> dict[str, float]:
        model.eval()
        s = self.split
        # Ranking stays on the device, so it may use the latest items even under record-level DP.
        histories, recent = evaluation_inputs(history, model.history_rows, s.train, s.val, self.cfg.recent_items)
        val_scores, test_scores = model.score_all(histories, recent=recent).numpy()
        return user_metrics(val_scores, s.train, s.val, s.test, s.val_negatives, s.test_negatives, test_scores)
