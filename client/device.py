"""One device for one user: a round of local training, its privacy bookkeeping, and its evaluation.

Independent of Flower so it can be tested and reused; `client.app` wraps it in a ClientApp.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from client.history import release_history
from client.private_fit import fit_private
from client.sampling import SOURCE as SAMPLING_SOURCE
from client.state import DeviceState
from client.trainer import train_local
from shared.config import RunConfig
from shared.data.split import UserSplit
from shared.features import ItemContent
from shared.metrics import user_metrics
from shared.model import (
    TwoTower, build_model, evaluation_inputs, private_state, shared_state,
)
from shared.privacy.accounting import SampledGaussian, epsilon
from shared.updates import clip_update

NEIGHBOURING = ("add or remove one interaction of this user (the interaction count is protected too: "
                "DP-SGD's sampling rate, steps and divisor and the history-release schedule are fixed)")


@dataclass
class Reply:
    """What a device sends (`delta`, `metrics`, `declined`) and, apart from it, what only a simulation's
    evaluation harness may read (`evaluation`). Under DP nothing that depends on the user's records may be
    sent unless noised and accounted, so `metrics` then holds only whether the device declined, which
    depends only on its ledger (mechanisms fixed by the configuration and its participation)."""

    delta: dict[str, torch.Tensor] | None  # shared weights after minus before; None if declined
    metrics: dict[str, float] = field(default_factory=dict)
    declined: str = ""
    evaluation: dict[str, float] = field(default_factory=dict)  # harness only under DP; never sent by a deployed device


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

    def ledger_heads(self) -> list[dict]:
        """The signed head of this user's ledger (none before its first entry): sent with every reply."""
        head = self.state.ledger_head()
        return [head] if head is not None else []

    def round_seed(self, server_round: int) -> int:
        # DP noise and Poisson sampling must be unknown to the server, so under record-level DP they are
        # seeded from the OS CSPRNG; without DP the run is reproducible from the config seed.
        if self.cfg.record_dp:
            return secrets.randbits(62)
        return _seed(self.cfg.seed, self.user_id, server_round)

    def private_start(self, model: TwoTower, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The private parameters this round starts from: last round's, or on first use drawn from a seed of
        the run and the user (reproducible; they never leave the device)."""
        private = {k: v for k, v in saved.items() if k != "history"}
        if private:
            return private
        generator = torch.Generator().manual_seed(_seed(self.cfg.seed, self.user_id, "private-vector"))
        return {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in private_state(model).items()}

    @property
    def history_sigma(self) -> float:
        return self.cfg.history_noise_multiplier if self.cfg.record_dp else 0.0

    def release_metadata(self, server_round: int, run_id: str) -> dict[str, str]:
        # What a saved release must match to be reused (noise and form: public), and when it was made.
        return {"history-sigma": repr(self.history_sigma), "history-form": "sum", "history-round": str(server_round),
                "history-run": run_id}

    def _release_due(self, meta: dict[str, str], server_round: int, run_id: str) -> bool:
        """Whether this round releases the history: the device's first round, then every
        `history-refresh-rounds` rounds of a run (a later run, whose rounds count afresh, starts with a release;
        with 0 a device releases once in its life). The schedule never looks at the history itself (a release
        when it changed would tell the server that it changed), so a history that grew is used through its
        last release until the next one."""
        if meta.get("history-sigma") != repr(self.history_sigma) or meta.get("history-form") != "sum":
            return True
        every = self.cfg.history_refresh_rounds
        if not every:
            return False
        return meta.get("history-run", "") != run_id or server_round - int(meta.get("history-round", server_round)) >= every

    def _history(self, saved: dict[str, torch.Tensor], server_round: int, run_id: str):
        """The history sum as training reads it, the ledger event it costs now (None when the last release
        is reused), and the metadata to save with it. Without record-level DP: the exact sum, every round."""
        rows = self.content.history_rows
        if self.history_sigma == 0:
            exact = release_history(rows, self.split.train, 0.0, torch.Generator())
            return exact, None, self.release_metadata(server_round, run_id)
        meta = self.state.private_metadata()
        if "history" in saved and not self._release_due(meta, server_round, run_id):
            return saved["history"], None, meta
        generator = torch.Generator().manual_seed(self.round_seed(server_round) + 7)
        released = release_history(rows, self.split.train, self.history_sigma, generator)
        return released, SampledGaussian(self.history_sigma, 1.0, 1), self.release_metadata(server_round, run_id)

    def _round_events(self, history_event: SampledGaussian | None) -> list[SampledGaussian]:
        events = [history_event] if history_event else []
        if self.cfg.record_dp:
            events.append(SampledGaussian(self.cfg.noise_multiplier, self.cfg.record_sample_rate, self.cfg.record_steps))
        return events

    def _record(self, server_round: int, run_id: str, history_event: SampledGaussian | None) -> None:
        """The round's record-level mechanisms in the ledger: each entry is fixed by the configuration and
        the round (of the run `run_id`; rounds are ordered within a run) alone (no example count, nothing from
        the data), so its hash and the head's entry count reveal nothing beyond participation."""
        cfg = self.cfg
        if history_event:
            self.state.ledger.append(
                level="record", round=server_round, mechanism="gaussian-history-release",
                noise_multiplier=history_event.noise_multiplier, sample_rate=1.0, steps=1,
                clip_norm=1.0, sampling="none", amplification=False, neighbouring=NEIGHBOURING,
                details={"sensitivity": "each history row has L2 norm <= 1",
                         "refresh_rounds": cfg.history_refresh_rounds, "run": run_id},
            )
        self.state.ledger.append(
            level="record", round=server_round, mechanism="dp-sgd",
            noise_multiplier=cfg.noise_multiplier, sample_rate=cfg.record_sample_rate,
            steps=cfg.record_steps, clip_norm=cfg.clip_norm, sampling="poisson-csprng", amplification=True,
            neighbouring=NEIGHBOURING,
            details={"divisor": cfg.batch_size, "grad_sample_mode": cfg.grad_sample_mode,
                     "sampling_source": SAMPLING_SOURCE,
                     "noise_source": "torch.Generator seeded with 62 bits from the OS CSPRNG", "run": run_id},
        )

    def train_round(self, global_state: dict[str, torch.Tensor], server_round: int, run_id: str = "") -> Reply:
        """One round of run `run_id` (the server's; a device's ledger spans every run it took part in)."""
        cfg = self.cfg
        model = build_model(self.content, self.n_catalogue, cfg)
        saved = self.state.load_private()
        model.load_state_dict({**self.private_start(model, saved), **global_state}, strict=True)
        history, history_event, release_meta = self._history(saved, server_round, run_id)

        if cfg.record_dp:
            # RDP is an upper bound on the tight epsilon and fast: a device may stop a round early, never
            # late. The round's events do not depend on the data, so neither does the decision.
            after = epsilon(self.state.ledger.events() + self._round_events(history_event), cfg.delta,
                            accountant="rdp-fast")
            if after > cfg.epsilon_budget:
                # Only a history released before may be used to evaluate: a new release would cost budget.
                evaluation = self.evaluate(model, history) if history_event is None else {}
                return Reply(
                    None, {"declined": 1.0},
                    f"user {self.user_id}: round {server_round} would raise record-level epsilon to "
                    f"{after:.3f} (RDP bound, delta {cfg.delta}) over the budget {cfg.epsilon_budget}",
                    evaluation,
                )
            self._record(server_round, run_id, history_event)

        fitted = None
        if cfg.fits_private and not cfg.record_dp:
            # Under user-level DP (or none) training may start from the vector fitted to the received weights.
            fitted = self.fit_private(model, history)
            self._set_private(model, fitted)
        before = {k: v.clone() for k, v in shared_state(model).items()}
        # Behaviour signals stay here: they weight this device's examples, never change what it sends.
        result = train_local(
            model, self.split.train, history, cfg, self.round_seed(server_round), cfg.record_dp,
            weights=self.split.weights, dislikes=self.split.dislikes,
        )
        self.state.save_private({**private_state(model), "history": history}, release_meta)

        delta = {k: v - before[k] for k, v in shared_state(model).items()}
        # The device serves the global weights it received with its freshly trained private vector: the
        # shared weights it trained locally carry this round's DP noise, which only averaging removes.
        model.load_state_dict(before, strict=False)
        if cfg.fits_private:
            # It ranks with the vector fitted to the received weights; under record-level DP fitted only now,
            # from the DP-trained one, and not kept (see client/private_fit.py).
            self._set_private(model, fitted if fitted is not None else self.fit_private(model, history))
        return self.reply(delta, {**self.evaluate(model, history), "train-loss": result.loss})

    def fit_private(self, model: TwoTower, history: torch.Tensor) -> torch.Tensor:
        """`client.private_fit.fit_private` for this device's training items under `model`'s weights."""
        return fit_private(model, self.split.train, history, model.users.user_vector.weight, self.cfg.private_fit_steps,
                           self.cfg.recent_items, self.split.weights)

    @staticmethod
    def _set_private(model: TwoTower, vector: torch.Tensor) -> None:
        with torch.no_grad():
            model.users.user_vector.weight.copy_(vector)

    def reply(self, delta: dict[str, torch.Tensor], evaluation: dict[str, float]) -> Reply:
        """A trained round's reply (also built by the vectorised cohort trainer, simulations/cohort.py)."""
        if self.cfg.user_dp:
            # Clipped on the device, so the same update works under secure aggregation.
            delta = clip_update(delta, self.cfg.user_clip_norm)
        # Without DP the device may report how it ranks its held-out items and its loss; under DP these
        # depend on its records (the loss, the masked training items, the latest items), so they stay here.
        sent = {} if self.cfg.dp != "none" else dict(evaluation)
        return Reply(delta, {**sent, "declined": 0.0}, evaluation=evaluation)

    @torch.no_grad()
    def evaluate(self, model: TwoTower, history: torch.Tensor) -> dict[str, float]:
        model.eval()
        s = self.split
        # Ranking stays on the device, so it may use the latest items even under record-level DP.
        histories, recent = evaluation_inputs(history, model.history_rows, s.train, s.val, self.cfg.recent_items)
        val_scores, test_scores = model.score_all(histories, recent=recent).numpy()
        return user_metrics(val_scores, s.train, s.val, s.test, s.val_negatives, s.test_negatives, test_scores)
