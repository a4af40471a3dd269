"""Hostile clients for the simulation harness: promotion attacks on one target item (never in a device's code
path: only the in-process engine, simulations/inprocess.py, adds them to a run).

`attack-fraction` x (honest clients) malicious clients join the federation beside the honest ones and receive
every round's global model like them:

- `fake-users`: each holds a fake history, the target item plus popular items, and otherwise trains exactly as
  an honest device does (`client.device.Device`), so the model learns that the target goes with popular items.
- `fedrecattack`, in the spirit of FedRecAttack (Rong et al., ICDE 2022): each crafts its update instead of
  training. It approximates users from public knowledge only (histories drawn from the items' popularity, the
  users' private vectors unknown and set to zero), takes a few plain gradient steps on the shared weights (so
  the norm goes where the gradient is: mostly the target's own rows) that raise the
  target's score above each approximate user's top `CRAFT_TOP` other items (softplus of the score gaps), and
  sends the change scaled to `attack-norm` (default: the largest update the server accepts whole).

Malicious clients send no evaluation: the harness measures the honest users only. The target is
`attack-target`, or an unpopular item (1 to 3 training interactions among the run's users) chosen from the seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from client.device import Device, Reply
from shared.config import ConfigError, RunConfig
from shared.data.split import UserSplit
from shared.features import ItemContent
from shared.model import build_model, is_private, private_state, recent_contexts, shared_state
from shared.updates import update_norm

POPULAR = 50  # fake histories and approximate users draw from the most popular items, by training count
FAKE_HISTORY = 20  # items of a fake user's history, the target included
APPROXIMATE_USERS = 64  # users each crafting client approximates per round
CRAFT_STEPS, CRAFT_LR, CRAFT_TOP = 10, 1.0, 5


def popularity(users: Sequence[UserSplit], n_items: int) -> np.ndarray:
    """Training interactions per item among `users` (what the attacker is assumed to know: public counts)."""
    counts = np.zeros(n_items)
    for u in users:
        np.add.at(counts, u.train, 1)
    return counts


def choose_target(cfg: RunConfig, counts: np.ndarray) -> int:
    """`attack-target`, or an item with 1 to 3 training interactions chosen from the seed."""
    if cfg.attack_target >= 0:
        if cfg.attack_target >= len(counts):
            raise ConfigError(f"attack-target = {cfg.attack_target}: the catalogue has items 0 .. {len(counts) - 1}")
        return cfg.attack_target
    unpopular = np.flatnonzero((counts >= 1) & (counts <= 3))
    if not len(unpopular):
        raise ConfigError("attack-target = -1: no item has 1 to 3 training interactions to promote; set attack-target")
    return int(np.random.default_rng(cfg.seed).choice(unpopular))


class Attack:
    """The malicious clients of a run (`devices`, nodes after the honest ones) and what they send."""

    def __init__(self, cfg: RunConfig, users: Sequence[UserSplit], content: ItemContent, n_items: int) -> None:
        count = round(cfg.attack_fraction * len(users))
        if count < 1:
            raise ConfigError(f"attack-fraction = {cfg.attack_fraction} of {len(users)} honest clients is no malicious "
                              "client: raise attack-fraction or max-users")
        self.cfg, self.n_items = cfg, n_items
        self.counts = popularity(users, n_items)
        self.target = choose_target(cfg, self.counts)
        self.counts[self.target] = 0  # never among the popular items the attack pairs it with
        self.popular = np.argsort(-self.counts, kind="stable")[:POPULAR]
        self.norm = cfg.attack_norm or cfg.accepted_norm
        root = Path(cfg.state_dir)
        self.devices = [Device(f"attacker-{k}", self._fake_split(k), content, n_items, cfg, root / f"attacker-{k}")
                        for k in range(count)]

    def _fake_split(self, k: int) -> UserSplit:
        rng = np.random.default_rng([self.cfg.seed, k])
        drawn = rng.choice(self.popular, FAKE_HISTORY + 1, replace=False)  # FAKE_HISTORY - 1 items, val, test
        train = np.append(drawn[:FAKE_HISTORY - 1], self.target)
        others = np.setdiff1d(np.arange(self.n_items), [*drawn, self.target])  # never-seen items
        # (its evaluation is never used: a tiny catalogue may repeat negatives)
        negatives = [rng.choice(others, self.cfg.eval_negatives, replace=len(others) < self.cfg.eval_negatives)
                     for _ in range(2)]
        return UserSplit(-1 - k, train, int(drawn[-2]), int(drawn[-1]), *negatives)

    @property
    def crafts(self) -> bool:
        """Whether the malicious clients craft their updates (else they train on their fake histories)."""
        return self.cfg.attack == "fedrecattack"

    def conceal(self, reply: Reply) -> Reply:
        """What a malicious client sends: its update, no evaluation (the harness measures honest users only)."""
        return Reply(reply.delta, {"declined": 0.0})

    def approximate_users(self, rng: np.random.Generator, content: ItemContent):
        """Histories drawn from the items' popularity: (history sums, recent items or None, history mask)."""
        p = self.counts / self.counts.sum()
        histories = [rng.choice(self.n_items, FAKE_HISTORY, replace=False, p=p) for _ in range(APPROXIMATE_USERS)]
        sums = torch.stack([content.history_rows[torch.as_tensor(h)].sum(0) for h in histories])
        k = self.cfg.recent_items
        recent = torch.cat([recent_contexts(h, k)[-1:] for h in histories]) if k else None
        seen = torch.zeros(APPROXIMATE_USERS, self.n_items, dtype=torch.bool)
        for i, h in enumerate(histories):
            seen[i, h] = True
        return sums, recent, seen

    def craft(self, device: Device, global_state: dict[str, torch.Tensor], server_round: int) -> Reply:
        """A FedRecAttack-style update (see top), of norm `self.norm`."""
        k = -1 - device.split.user
        rng = np.random.default_rng([self.cfg.seed, k, server_round])
        model = build_model(device.content, self.n_items, self.cfg)
        unknown = {n: torch.zeros_like(v) for n, v in private_state(model).items()}
        model.load_state_dict({**unknown, **global_state})
        params = [p for n, p in model.named_parameters() if p.requires_grad and not is_private(n)]
        histories, recent, seen = self.approximate_users(rng, device.content)
        optimizer = torch.optim.SGD(params, lr=CRAFT_LR)
        items = torch.arange(self.n_items)
        for _ in range(CRAFT_STEPS):
            user = model.user_vectors(histories, recent=recent)
            scores = model.logit_scale * user @ model.items(items).T + model.items.offset(items)
            others = scores.masked_fill(seen, -math.inf)
            others[:, self.target] = -math.inf
            top = others.topk(CRAFT_TOP, dim=1).values
            loss = F.softplus(top - scores[:, self.target:self.target + 1]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        delta = {n: v.detach() - global_state[n] for n, v in shared_state(model).items()}
        scale = self.norm / max(update_norm(delta), 1e-12)
        return Reply({n: v * scale for n, v in delta.items()}, {"declined": 0.0})
