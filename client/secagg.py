"""The device side of secure aggregation (Flower SecAgg+, legacy message format).

`secure_mod` runs Flower's `secaggplus_mod` only on SecAgg+ messages, so the same ClientApp serves plain
rounds (Message API) and secure ones; it installs avrec's cryptographic mask PRG first
(`shared.privacy.masks`: the server installs the same one). In the SecAgg+ stage that collects masked
vectors the mod calls `train_legacy`, which runs the same `Device.train_round` as a plain round and hands
back what the device sends: its clipped update (trust-model central), or under trust-model secure its
discrete Gaussian noise share of it, encoded so that Flower's quantisation yields the share exactly
(`shared.secure.secagg_input`). The mod masks it, and only the masked vector leaves the device, with the
signed heads of its ledgers (`shared.privacy.device_heads`) as on the plain path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from safetensors.torch import save_file

from client.device import Device
from shared.config import RunConfig, from_flat
from shared.privacy.device_heads import head_fields
from shared.privacy.masks import install as install_secure_masks
from shared.secure import noised_share, secagg_input


class InjectedDropout(RuntimeError):
    """Fault injection (`fault-drop-after-key-sharing`): this device leaves after sharing its keys."""


class TooFewSurvivors(RuntimeError):
    """Trust-model secure: the device will not help unmask a sum carrying too few noise shares."""


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return call_next(msg, context)
    install_secure_masks()  # idempotent: masks from the full seed, as the server removes them
    cfg = from_flat(context.run_config)
    stage = configs.get(Key.STAGE)
    drop = cfg.fault_drop_after_key_sharing
    if (stage == Stage.COLLECT_MASKED_VECTORS and drop >= 0
            and int(context.node_config.get("partition-id", -1)) == drop):
        # The device has sent its key shares and now leaves without sending its masked vector.
        raise InjectedDropout(f"partition {drop} drops out after key sharing (fault-drop-after-key-sharing)")
    if stage == Stage.UNMASK and cfg.secure_trust:
        check_unmask(configs, cfg)
    return secaggplus_mod(msg, context, call_next)


def check_unmask(configs: ConfigRecord, cfg: RunConfig) -> None:
    """Trust-model secure: the noise of a sum is that of the shares in it. A device sends the key shares that
    unmask the sum only if at least secure-min-fraction of its SecAgg+ neighbourhood (itself included; all
    devices when there are at most secagg-num-shares) sent a masked vector, so a server that drops devices
    cannot unmask a sum with less noise than the accountant allows."""
    active = len(configs.get(Key.ACTIVE_NODE_ID_LIST, []))
    dead = len(configs.get(Key.DEAD_NODE_ID_LIST, []))
    least = max(1, math.ceil(cfg.secure_min_fraction * (active + dead)))
    if active < least:
        raise TooFewSurvivors(f"only {active} of {active + dead} devices in this device's neighbourhood sent a share, "
                              f"fewer than secure-min-fraction allows ({least}): it does not help unmask the sum")


def is_legacy_fit(msg: Message) -> bool:
    return "fitins.parameters" in msg.content.array_records


def outgoing(delta: dict[str, torch.Tensor], keys: list[str], cfg: RunConfig, config) -> list[np.ndarray]:
    """What the mod quantises and masks: the clipped update, or under trust-model secure its noise share."""
    if not cfg.secure_trust:
        return [delta[k].numpy() for k in keys]
    share = noised_share(delta, cfg, int(config["secure-expected"]), int(config["secure-rotation-seed"]))
    return [secagg_input(share, cfg.secure_bits)]


def keep_audit_copy(state_root: Path, server_round: int, delta: dict[str, torch.Tensor], sent: list[np.ndarray],
                    cfg: RunConfig) -> None:
    """`secagg-audit`: kept on the device's own disk, never sent: lets a test compare the secure sum with the
    plain sum of the updates (and, under trust-model secure, the modular sum of the shares)."""
    save_file({k: v.contiguous() for k, v in delta.items()}, str(state_root / f"sent-round-{server_round}.safetensors"))
    if cfg.secure_trust:
        share = torch.from_numpy(np.rint(sent[0]).astype(np.int64) + 2 ** (cfg.secure_bits - 1))
        save_file({"share": share}, str(state_root / f"share-round-{server_round}.safetensors"))


def train_legacy(msg: Message, device, state_root: Path) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config["keys"]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    global_state = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
    server_round = int(fitins.config["server-round"])
    reply = device.train_round(global_state, server_round, str(fitins.config.get("run-id", "")))
    # A device that declines sends zeros (under trust-model secure, its noise share of zeros): under SecAgg+
    # every device that shared keys must send a vector.
    delta = reply.delta if reply.delta is not None else {k: torch.zeros_like(v) for k, v in global_state.items()}
    sent = outgoing(delta, keys, device.cfg, fitins.config)
    if device.cfg.secagg_audit:
        keep_audit_copy(state_root, server_round, {k: delta[k] for k in keys}, sent, device.cfg)
    # A simulated device (a Device, not a deployed DeviceDirectory) also hands its evaluation to the harness.
    metrics = {**reply.metrics, **(reply.evaluation if isinstance(device, Device) else {})}
    # The signed ledger heads travel as on the plain path, among the FitRes metrics (which carry only scalars).
    metrics = {**{k: float(v) for k, v in metrics.items()}, **head_fields(device.ledger_heads())}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(sent), 1, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
