"""The Flower ClientApp: one device, one user.

In simulation, node `partition-id` k is the k-th user of the split and sees only that user's split; in a
deployment (`data-dir` in the node config) the device reads its own directory.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import Device, Reply
from client.directory import DeviceDirectory
from client.secagg import is_legacy_fit, secure_mod, train_legacy
from shared.config import RunConfig, from_flat
from shared.data.resolve import resolve_dataset
from shared.data.signals import run_split
from shared.features import EncoderSettings, load_cached
from shared.privacy.device_heads import HEADS_RECORD, head_fields
from shared.secure import noised_share

app = ClientApp()
torch.set_num_threads(1)  # simulated devices run side by side; one thread each was fastest here
# Opacus's full-backward-hook notice fires on every step (our inputs need no gradient): noise in logs.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@functools.lru_cache(maxsize=2)
def population(cfg: RunConfig):
    dataset_dir = resolve_dataset(cfg)
    dataset, content = load_cached(str(dataset_dir), cfg.modalities, cfg.cache_dir, EncoderSettings.from_config(cfg))
    split = run_split(dataset, cfg)
    users = split.users[: cfg.max_users] if cfg.max_users else split.users
    return dataset, content, users


def simulated_device(cfg: RunConfig, partition_id: int) -> Device:
    dataset, content, users = population(cfg)
    if not 0 <= partition_id < len(users):
        raise ValueError(
            f"partition-id {partition_id} is outside the {len(users)} users of this run; "
            "the federation's num-supernodes must equal the number of clients"
        )
    user = users[partition_id]
    user_id = dataset.user_ids[user.user]
    return Device(user_id, user, content, dataset.n_items, cfg, Path(cfg.state_dir) / user_id)


def device_for(context: Context, cfg: RunConfig) -> Device | DeviceDirectory:
    """Deployment: node config `data-dir` (and optional `state-dir`, `cache-dir`) names the device's own
    files. Simulation: node config `partition-id` picks one user of the shared dataset."""
    node = context.node_config
    if "data-dir" in node:
        return DeviceDirectory(str(node["data-dir"]), cfg, str(node.get("state-dir", "")), str(node.get("cache-dir", "")))
    if "partition-id" in node:
        return simulated_device(cfg, int(node["partition-id"]))
    raise ValueError(
        f"node config {dict(node)} has neither data-dir (a deployed device: start flower-supernode with "
        "--node-config 'data-dir=\"/path/to/device/data\"') nor partition-id (simulation)"
    )


def ray_node() -> str | None:
    """The id of the Ray node this process runs on, when it is a Ray worker (Flower's simulation engine)."""
    ray = sys.modules.get("ray")  # never imported here: only a process Ray started has it loaded
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def state_root(device: Device | DeviceDirectory) -> Path:
    return device.state_dir if isinstance(device, DeviceDirectory) else device.state.root


def secure_share(reply, global_state: dict[str, torch.Tensor], msg: Message, cfg: RunConfig, simulated: bool) -> torch.Tensor:
    """trust-model = secure without secure aggregation: the update as a noise share (zeros for a device that
    declined: its share of the noise still counts). Unmasked, only a simulation's harness may carry it; a
    deployed device refuses (with secure-aggregation = true its share travels masked: client/secagg.py)."""
    if not simulated:
        raise RuntimeError(
            "trust-model = secure on the deployment engine needs secure-aggregation = true (SecAgg+ masks the "
            "shares): the device refuses to send an unmasked share")
    update = reply.delta if reply.delta is not None else {k: torch.zeros_like(v) for k, v in global_state.items()}
    config = msg.content["config"]
    return noised_share(update, cfg, int(config["secure-expected"]), int(config["secure-rotation-seed"]))


@app.train(mods=[secure_mod])
def train(msg: Message, context: Context) -> Message:
    cfg = from_flat(context.run_config)
    device = device_for(context, cfg)
    if is_legacy_fit(msg):  # a SecAgg+ round (secure-aggregation = true): see client/secagg.py
        return train_legacy(msg, device, state_root(device))
    global_state = msg.content["arrays"].to_torch_state_dict()
    config = msg.content["config"]
    reply = device.train_round(global_state, int(config["server-round"]), str(config.get("run-id", "")))
    return reply_message(msg, reply, device, cfg, global_state)


def reply_message(msg: Message, reply: Reply, device: Device | DeviceDirectory, cfg: RunConfig,
                  global_state: dict[str, torch.Tensor]) -> Message:
    """What a device sends back for a train message (also built by the in-process engine, simulations/inprocess.py)."""
    records: dict = {"metrics": MetricRecord(reply.metrics)}
    simulated = isinstance(device, Device)
    if simulated and reply.evaluation:
        # A simulated device: its evaluation goes to the harness in a record of its own. A deployed device
        # (DeviceDirectory) never sends it.
        records["harness"] = MetricRecord(reply.evaluation)
    if simulated and (node := ray_node()):  # where the simulation ran this device: rounds.jsonl counts them
        records["harness-ray-node"] = ConfigRecord({"id": node})
    if cfg.secure_trust:
        records["arrays"] = ArrayRecord({"share": secure_share(reply, global_state, msg, cfg, simulated)})
    elif reply.delta is not None:
        records["arrays"] = ArrayRecord(reply.delta)
    if reply.delta is None:
        records["config"] = ConfigRecord({"reason": reply.declined})
    # One signed ledger head per user on this device; the server keeps the latest of each, so a ledger
    # rolled back later no longer matches.
    if heads := device.ledger_heads():
        records[HEADS_RECORD] = ConfigRecord(head_fields(heads))
    return Message(RecordDict(records), reply_to=msg)
