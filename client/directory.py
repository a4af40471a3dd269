"""A deployed device: the user(s) whose data sits in the device's own directory.

The directory is in avrec's dataset format: `interactions.csv` holds only this device's users, and
`items.csv` (plus any `features/`) is the whole catalogue, identical on every device and on the server,
so item indices agree everywhere. From these files alone the device computes what simulation computes
from the full dataset:

- the leave-one-out split of each of its users (latest interaction test, second latest validation): it
  depends only on that user's own interactions, so it is the same split as in simulation;
- the evaluation negatives: uniform draws from the catalogue items the user never interacted with,
  which the device knows exactly (its full history and the full catalogue). The random stream is keyed
  by (seed, the user's index among this device's users), so the draws differ from a simulation of the
  whole population; the protocol and its distribution are the same.

Item embeddings are computed here with the device's own encoders (cached on its disk). Each user is
trained as its own `Device` (its own record-level ledger and private vector under `state-dir/<user id>`);
a device holding several users (a shared household screen, or a slice in tests) sends the mean of their
updates, so its whole contribution has the same norm bound as one user's: under user-level DP the
protected unit is everything on one device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from client.device import Device, Reply
from shared.config import RunConfig
from shared.data.signals import run_split
from shared.features import EncoderSettings, load_cached
from shared.metrics import mean_metrics


class DeviceDirectory:
    def __init__(self, data_dir: str | Path, cfg: RunConfig, state_dir: str | Path = "", cache_dir: str = "") -> None:
        self.cfg = cfg
        self.data_dir = Path(data_dir).expanduser().resolve()
        if not (self.data_dir / "interactions.csv").is_file() or not (self.data_dir / "items.csv").is_file():
            raise FileNotFoundError(
                f"node config data-dir = {str(data_dir)!r}: expected a directory holding this device's "
                "interactions.csv and the catalogue's items.csv (see README, 'Deploying to devices')"
            )
        self.state_dir = Path(state_dir).expanduser() if state_dir else self.data_dir / "state"
        # The run config's cache-dir names a path on the server's machine: a device uses its own.
        dataset, content = load_cached(str(self.data_dir), cfg.modalities, cache_dir, EncoderSettings.from_config(cfg))
        split = run_split(dataset, cfg)
        self.devices = [
            Device(dataset.user_ids[u.user], u, content, dataset.n_items, cfg, self.state_dir / dataset.user_ids[u.user])
            for u in split.users
        ]
        if not self.devices:
            raise ValueError(f"{self.data_dir / 'interactions.csv'}: no user with enough interactions to train")

    def ledger_heads(self) -> list[dict]:
        """The signed head of each of this device's users' ledgers: sent with every reply."""
        return [head for d in self.devices for head in d.ledger_heads()]

    def train_round(self, global_state: dict[str, torch.Tensor], server_round: int, run_id: str = "") -> Reply:
        replies = [d.train_round(global_state, server_round, run_id) for d in self.devices]
        sent = [r.delta for r in replies if r.delta is not None]
        # Only what each user's device may send (Reply.metrics); their harness results never leave here.
        scored = [{k: v for k, v in r.metrics.items() if "/" in k} for r in replies]
        metrics = mean_metrics(m for m in scored if m)
        losses = [r.metrics["train-loss"] for r in replies if "train-loss" in r.metrics]
        if losses:
            metrics["train-loss"] = sum(losses) / len(losses)
        metrics["users"] = float(len(replies))
        metrics["users-declined"] = float(len(replies) - len(sent))
        if not sent:
            metrics["declined"] = 1.0
            return Reply(None, metrics, "; ".join(r.declined for r in replies))
        metrics["declined"] = 0.0
        delta = {k: torch.stack([d[k] for d in sent]).mean(0) for k in sent[0]}
        return Reply(delta, metrics)
