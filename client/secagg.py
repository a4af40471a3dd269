"""The device side of secure aggregation (Flower SecAgg+, legacy message format).

`secure_mod` runs Flower's `secaggplus_mod` only on SecAgg+ messages, so the same ClientApp serves plain
rounds (Message API) and secure ones. In the SecAgg+ stage that collects masked vectors the mod calls
`train_legacy`, which runs the same `Device.train_round` as a plain round and hands back the clipped
update; the mod quantises and masks it, and only the masked vector leaves the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from safetensors.torch import save_file

from client.device import Device
from shared.config import from_flat


class InjectedDropout(RuntimeError):
    """Fault injection (`fault-drop-after-key-sharing`): this device leaves after sharing its keys."""


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return call_next(msg, context)
    drop = from_flat(context.run_config).fault_drop_after_key_sharing
    if (configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS and drop >= 0
            and int(context.node_config.get("partition-id", -1)) == drop):
        # The device has sent its key shares and now leaves without sending its masked vector.
        raise InjectedDropout(f"partition {drop} drops out after key sharing (fault-drop-after-key-sharing)")
    return secaggplus_mod(msg, context, call_next)


def is_legacy_fit(msg: Message) -> bool:
    return "fitins.parameters" in msg.content.array_records


def train_legacy(msg: Message, device, state_root: Path) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config["keys"]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    global_state = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
    server_round = int(fitins.config["server-round"])
    reply = device.train_round(global_state, server_round)
    # A device that declines sends zeros: under SecAgg+ every device that shared keys must send a vector.
    delta = reply.delta if reply.delta is not None else {k: torch.zeros_like(v) for k, v in global_state.items()}
    if device.cfg.secagg_audit:
        # Kept on the device's own disk, never sent: lets a test compare the secure sum with the plain one.
        save_file({k: delta[k].contiguous() for k in keys}, str(state_root / f"sent-round-{server_round}.safetensors"))
    # A simulated device (a Device, not a deployed DeviceDirectory) also hands its evaluation to the harness.
    metrics = {**reply.metrics, **(reply.evaluation if isinstance(device, Device) else {})}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([delta[k].numpy() for k in keys]), 1,
                 {k: float(v) for k, v in metrics.items()})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
