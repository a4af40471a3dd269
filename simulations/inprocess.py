"""The in-process engine: the avrec ServerApp's own loop (`server.app.run`) over simulated devices that live
in this process, without a SuperLink, Ray or per-message processes.

`InProcessGrid` offers the part of Flower's `Grid` the server loop uses (node ids, push, pull). A pull
answers every pending train message at once: without record-level DP the devices' local rounds run as one
batched computation (`simulations.cohort`), with it each device runs `Device.train_round` (Opacus) in turn.
Replies are built by the ClientApp's own `reply_message`, so the server sees what Flower would deliver;
`tests/test_inprocess.py` checks that a run gives the same model as on Flower's simulation engine.

With `attack` set, the run's malicious clients (`simulations.attacks`) are nodes after the honest ones: they
receive every train message like them, and their replies go through the same `reply_message` and aggregation.

Not covered: `secure-aggregation = true` (the SecAgg+ protocol runs only on Flower's engines). Under
trust-model `secure` the devices' noise shares are encoded here and summed by the server as in Flower's
simulation (`server.secure_sum`).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable
from uuid import uuid4

import torch
from flwr.app import Message, MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client.app import population, reply_message, simulated_device
from client.device import Device
from server.app import run
from shared.config import ConfigError, RunConfig
from simulations.attacks import Attack
from simulations.cohort import train_cohort, vectorised

Progress = Callable[[int, int, float], None]  # (devices done, devices asked, seconds since the pull began)


class InProcessGrid:
    """Nodes 1..n are the run's first n users (node k is partition k - 1, as on Flower's simulation engine);
    the attack's malicious clients, if any, are nodes n + 1 onwards."""

    def __init__(self, cfg: RunConfig, clients: int, progress: Progress | None = None, attack: Attack | None = None) -> None:
        self.cfg = cfg
        self.clients, self.attack = clients, attack
        self.nodes = list(range(1, clients + 1 + (len(attack.devices) if attack else 0)))
        self.pending: dict[str, Message] = {}
        self.answered: dict[str, Message] = {}
        self.progress = progress

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            if msg.metadata.message_type != MessageType.TRAIN:
                raise ValueError(f"the in-process engine answers train messages only, got {msg.metadata.message_type!r}")
            msg.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            self.pending[message_id] = msg
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        if self.pending:
            batch, self.pending = list(self.pending.values()), {}
            for reply in self._answer(batch):
                self.answered[reply.metadata.reply_to_message_id] = reply
        return [self.answered.pop(i) for i in list(message_ids) if i in self.answered]

    def _device(self, node: int) -> Device:
        if node > self.clients and self.attack:
            return self.attack.devices[node - self.clients - 1]
        return simulated_device(self.cfg, node - 1)

    def _answer(self, messages: list[Message]) -> list[Message]:
        cfg = self.cfg
        devices = [self._device(m.metadata.dst_node_id) for m in messages]
        global_state = messages[0].content["arrays"].to_torch_state_dict()
        config = messages[0].content["config"]
        server_round, run_id = int(config["server-round"]), str(config.get("run-id", ""))
        malicious = [self.attack is not None and m.metadata.dst_node_id > self.clients for m in messages]
        crafting = self.attack is not None and self.attack.crafts
        trained = iter(self._train([d for d, bad in zip(devices, malicious) if not (bad and crafting)],
                                   global_state, server_round, run_id))
        replies = [self.attack.craft(d, global_state, server_round) if bad and crafting else next(trained)
                   for d, bad in zip(devices, malicious)]
        replies = [self.attack.conceal(r) if bad else r for r, bad in zip(replies, malicious)]
        # Encoding noise shares (trust-model secure) is numpy work that releases the GIL: one thread per core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return list(pool.map(lambda a: reply_message(*a, cfg, global_state), zip(messages, replies, devices)))

    def _train(self, devices: list[Device], global_state: dict[str, torch.Tensor], server_round: int,
               run_id: str) -> list:
        """Each device's round: batched without record-level DP, else `Device.train_round` in turn."""
        started = time.perf_counter()
        if vectorised(self.cfg):
            done = (lambda n: self.progress(n, len(devices), time.perf_counter() - started)) if self.progress else None
            return train_cohort(devices, global_state, server_round, done, run_id)
        replies = []
        for done, device in enumerate(devices, 1):
            replies.append(device.train_round(global_state, server_round, run_id))
            if self.progress:
                self.progress(done, len(devices), time.perf_counter() - started)
        return replies


def run_inprocess(cfg: RunConfig, clients: int, dataset_dir: str, progress: Progress | None = None,
                  threads: int | None = None) -> None:
    """Run the ServerApp's loop to completion on `clients` in-process devices, with `threads` torch threads
    (default: one per core)."""
    if cfg.secure_aggregation:
        raise ConfigError("secure-aggregation = true runs the SecAgg+ protocol, which only Flower's engines carry: "
                          "use --engine flower (trust-model = secure alone works in process)")
    # What Flower's ServerApp runner sets before `main`: message metadata reads it (one run, one task here).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    # Opacus's import configures the root logger, which would print each of Flower's log lines twice here.
    logging.getLogger("flwr").propagate = False
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)  # client.app sets one thread for side-by-side devices
    try:
        attack = None
        if cfg.attack != "none":
            dataset, content, users = population(cfg)
            attack = Attack(cfg, users, content, dataset.n_items)
        # Every train message of a round is pushed at once, so each pull trains the whole cohort together.
        run(InProcessGrid(cfg, clients, progress, attack), cfg.replace(messages_in_flight=0), dataset_dir)
    finally:
        torch.set_num_threads(before)
