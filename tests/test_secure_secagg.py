"""Trust model `secure` over Flower's SecAgg+, and SecAgg+ masks from a cryptographic PRG.

Fast (in process, seconds): the mask PRG uses the whole seed where Flower's folds it to 32 bits, is
uniform, and is installed in every Flower module; a share survives Flower's quantisation exactly; and
full SecAgg+ rounds (Flower's real `SecAggPlusWorkflow` on the server and avrec's `secure_mod` /
`train_legacy` around Flower's real `secaggplus_mod` on five devices, messages routed in memory instead of
through a SuperLink) give exactly the modular sum the simulation computes directly from the same shares,
survive a device that leaves after key sharing (the ledger records one fewer survivor), and release nothing
when too few devices remain. The same protocol on Flower's simulation engine: tests/test_secagg.py (trust
model central) and `test_secure_trust_over_secagg_on_the_simulation_engine` below (with record-level DP on the
devices too, whose signed ledger heads the SecAgg+ replies deliver into the audit manifest).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from safetensors.torch import load_file
from scipy.stats import chisquare

from client.device import Reply
from client.secagg import secure_mod, train_legacy
from server.secagg import PROTOCOL, SecAggFedAvg, secagg_workflow
from shared.config import ConfigError, RunConfig, load_config
from shared.privacy import masks
from shared.privacy.distributed_dp import modular_sum
from shared.privacy.ledger import PrivacyLedger
from shared.secure import decode_total, secagg_input, secagg_ranges, secagg_total
from shared.updates import clip_update

# ------------------------------------------------------------------------------------------- the PRG


def seeds_equal_after_flower_fold() -> tuple[bytes, bytes]:
    """Two 32-byte seeds that differ only above their low 32 bits (in words 1 and 2) by the same XOR, so
    Flower's fold (XOR of the 4-byte words) maps both to the same 32-bit seed."""
    a = bytearray(os.urandom(32))
    b = bytearray(a)
    for i in range(4, 12):
        b[i] ^= 0x5A
    return bytes(a), bytes(b)


def test_masks_depend_on_the_whole_seed_where_flower_folds_it_to_32_bits():
    a, b = seeds_equal_after_flower_fold()
    assert a[:4] == b[:4] and a != b
    shapes = [(1000,), (3, 4)]
    flower = masks.flower_prg()
    assert all(np.array_equal(x, y) for x, y in zip(flower(a, 2**32, shapes), flower(b, 2**32, shapes)))
    ours_a, ours_b = masks.secure_prg(a, 2**32, shapes), masks.secure_prg(b, 2**32, shapes)
    assert not np.array_equal(ours_a[0], ours_b[0]) and not np.array_equal(ours_a[1], ours_b[1])
    # Deterministic in the seed (both sides of the protocol must draw the same masks), with Flower's shapes.
    again = masks.secure_prg(a, 2**32, shapes)
    assert all(np.array_equal(x, y) and x.dtype == np.int64 for x, y in zip(ours_a, again))
    assert [m.shape for m in ours_a] == shapes and masks.secure_prg(a, 2**32, [()])[0].shape == ()


@pytest.mark.parametrize("num_range", [10, 16, 2**32])
def test_masks_are_uniform(num_range):
    draws = masks.secure_prg(b"\x07" * 32, num_range, [(200_000,)])[0]
    assert draws.min() >= 0 and draws.max() < num_range
    if num_range > 16:  # 2^32: each of the top 4 bits' 16 patterns equally often, and the full range reached
        draws, num_range = draws >> 28, 16
        assert masks.secure_prg(b"\x07" * 32, 2**32, [(200_000,)])[0].max() > 2**32 - 2**24
    counts = np.bincount(draws, minlength=num_range)
    assert chisquare(counts).pvalue > 1e-3, counts


def test_the_prg_is_installed_in_every_flower_module_that_imported_it():
    masks.install()
    assert masks.installed()
    for name in masks.FLOWER_PRG_MODULES:
        assert sys.modules[name].pseudo_rand_gen is masks.secure_prg, name


# ---------------------------------------------------------------------------------- shares, exactly


@pytest.mark.parametrize("bits", [8, 20, 30])
def test_a_share_survives_flower_quantisation_exactly(bits):
    rng = np.random.default_rng(bits)
    share = np.concatenate([[0, 2**bits - 1, 2 ** (bits - 1)], rng.integers(0, 2**bits, 10_000)])
    clip, levels = secagg_ranges(bits)
    for _ in range(3):  # stochastic rounding must never move an exact integer
        (quantised,) = quantize([secagg_input(share, bits)], clip, levels)
        assert np.array_equal(quantised.astype(np.int64), share)


def test_the_sum_is_recovered_from_the_workflow_mean():
    bits, n = 20, 7
    rng = np.random.default_rng(0)
    shares = [rng.integers(0, 2**bits, 1000) for _ in range(n)]
    s = np.sum(shares, axis=0)
    # Flower's unmask: dequantize (scale 1, shift -T/2), add -(n-1) T/2, times T / (n T) in float64
    mean = (s.astype(float) - 2 ** (bits - 1) - (n - 1) * 2 ** (bits - 1)) * (2**bits / (n * 2**bits))
    assert np.array_equal(secagg_total(mean, n, bits), modular_sum(shares, bits))


def test_config_allows_secure_trust_over_secagg_with_a_majority_threshold():
    cfg = load_config(overrides={"dp": "user", "trust-model": "secure", "secure-aggregation": True})
    assert cfg.secure_aggregation and cfg.trust_model == "secure"
    with pytest.raises(ConfigError, match="threshold > secagg-num-shares / 2"):
        load_config(overrides={"dp": "user", "trust-model": "secure", "secure-aggregation": True,
                               "secagg-num-shares": 7, "secagg-reconstruction-threshold": 3})
    with pytest.raises(ConfigError, match="every round to every available device"):
        load_config(overrides={"dp": "user", "secure-aggregation": True, "fraction-train": 0.5})


# ------------------------------------------------------------------- full SecAgg+ rounds in memory

DEVICES = 5
REFERENCE = {"a.weight": torch.zeros(40, 8), "b.bias": torch.zeros(17)}


class FakeProxy:
    def __init__(self, node_id: int) -> None:
        self.node_id, self.cid = node_id, str(node_id)


class FakeManager:
    def __init__(self, ids) -> None:
        self.proxies = [FakeProxy(i) for i in ids]

    def num_available(self) -> int:
        return len(self.proxies)

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return self.proxies[:num_clients]


class FixedDevice:
    """A device whose training always yields the same clipped update."""

    def __init__(self, cfg: RunConfig, delta: dict[str, torch.Tensor]) -> None:
        self.cfg, self.delta = cfg, delta

    def train_round(self, global_state, server_round, run_id=""):
        return Reply({k: v.clone() for k, v in self.delta.items()}, {"declined": 0.0})

    def ledger_heads(self) -> list[dict]:
        return []  # user level only: no record-level ledger on the device


class InMemoryGrid:
    """Delivers each message to its device's ClientApp stack (`secure_mod` -> Flower's `secaggplus_mod` ->
    `train_legacy`) and returns the replies; an exception becomes an error reply, as a SuperNode sends.
    `silent` devices never answer from the masked-vector stage on (they left)."""

    def __init__(self, cfg: RunConfig, root: Path, silent=()) -> None:
        self.silent = set(silent)
        self.devices, self.contexts, self.roots = {}, {}, {}
        g = torch.Generator().manual_seed(1)
        for k in range(DEVICES):
            node = 100 + k
            update = clip_update({n: torch.randn(v.shape, generator=g) for n, v in REFERENCE.items()}, cfg.user_clip_norm)
            self.devices[node] = FixedDevice(cfg, update)
            self.contexts[node] = Context(run_id=1, node_id=node, node_config={"partition-id": k}, state=RecordDict(),
                                          run_config=cfg.to_flat())
            self.roots[node] = root / f"device-{k}"
            self.roots[node].mkdir(parents=True)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in map(copy.deepcopy, messages):  # a copy each, as if serialised: the workflow reuses contents
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if node in self.silent and stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
                replies.append(Message(Error(0, "device left"), reply_to=msg))
                continue
            try:
                replies.append(secure_mod(msg, self.contexts[node],
                                          lambda m, c, node=node: train_legacy(m, self.devices[node], self.roots[node])))
            except Exception as exc:  # noqa: BLE001 - what a SuperNode turns into an error reply
                replies.append(Message(Error(0, f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process knows about itself (Flower's `Message` reads it); set here, in process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def secagg_round(tmp_path: Path, **overrides):
    """One SecAgg+ round of Flower's real workflow and mod under trust-model secure; returns the run's
    directory, the strategy, the grid and the configuration."""
    silent = overrides.pop("silent", ())
    cfg = load_config(overrides={"dp": "user", "trust-model": "secure", "secure-aggregation": True,
                                 "secagg-audit": True, "min-clients": DEVICES, "num-rounds": 1,
                                 "user-noise-multiplier": 0.5, "secure-min-fraction": 0.8, "user-epsilon-budget": 100.0,
                                 "out": str(tmp_path / "run"), **overrides})
    (tmp_path / "run").mkdir()
    masks.install()
    strategy = SecAggFedAvg(cfg, {k: v.clone() for k, v in REFERENCE.items()}, tmp_path / "run")
    grid = InMemoryGrid(cfg, tmp_path, silent)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=FakeManager(grid.devices))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([v.numpy() for v in REFERENCE.values()]), True)
    secagg_workflow(cfg, strategy.mechanism).fit_workflow(grid, context)
    return tmp_path / "run", strategy, grid, cfg


def device_shares(grid: InMemoryGrid) -> list[np.ndarray]:
    files = [grid.roots[n] / "share-round-1.safetensors" for n in sorted(grid.roots)]
    return [load_file(f)["share"].numpy() for f in files if f.exists()]


def test_secagg_sum_is_the_direct_modular_sum_of_the_same_shares(tmp_path):
    out, strategy, grid, cfg = secagg_round(tmp_path)
    shares = device_shares(grid)
    assert len(shares) == DEVICES
    secure = load_file(out / "secure-sum-round-1.safetensors")["modular-sum"].numpy()
    direct = modular_sum(shares, cfg.secure_bits)  # what the simulation path computes from the shares
    assert np.array_equal(secure, direct)
    assert len(np.unique(secure)) > 100  # a real sum, not zeros
    # Decoded identically: the same SecureRound decodes the same integers.
    secure_round = strategy.mechanism.round
    expected = decode_total(direct, secure_round.plan, secure_round.rotation_seed, secure_round.denominator, REFERENCE)
    decoded = load_file(out / "decoded-sum-round-1.safetensors")
    assert all(torch.equal(decoded[k], expected[k].double() * DEVICES) for k in REFERENCE)
    # ... and it is the plain sum of the updates plus the devices' noise (std sigma * C in all).
    plain = {k: sum(d.delta[k].double() for d in grid.devices.values()) for k in REFERENCE}
    error = torch.cat([(decoded[k] - plain[k]).reshape(-1) for k in REFERENCE])
    assert float(error.std()) == pytest.approx(cfg.user_noise_multiplier * cfg.user_clip_norm, rel=0.25)
    (entry,) = PrivacyLedger(out / "server-ledger.jsonl", level="user").entries
    assert entry.mechanism == "ddg-secure-sum" and entry.details["secure_aggregation"] == PROTOCOL
    assert entry.details["survivors"] == entry.details["expected"] == DEVICES
    assert entry.details["participants"] == sorted(grid.devices) and not entry.amplification
    assert masks.installed()


def test_a_device_leaving_after_key_sharing_is_survived_with_one_fewer_share(tmp_path):
    out, strategy, grid, cfg = secagg_round(tmp_path, **{"fault-drop-after-key-sharing": 2})
    shares = device_shares(grid)
    assert len(shares) == DEVICES - 1  # the device that left never trained
    secure = load_file(out / "secure-sum-round-1.safetensors")["modular-sum"].numpy()
    assert np.array_equal(secure, modular_sum(shares, cfg.secure_bits))
    (entry,) = PrivacyLedger(out / "server-ledger.jsonl", level="user").entries
    assert (entry.details["survivors"], entry.details["expected"], entry.details["min_survivors"]) == (4, 5, 4)
    row = json.loads((out / "rounds.jsonl").read_text())
    assert row["clients_aggregated"] == 4 and row["clients_failed"] == 1


def test_too_few_survivors_release_no_sum(tmp_path):
    # Two of five leave: 3 < secure-min-fraction 0.8 x 5. The devices refuse to help unmask, so the server
    # never learns a sum with less noise than accounted; nothing is decoded or charged.
    out, strategy, grid, cfg = secagg_round(tmp_path, **{"fault-drop-after-key-sharing": 2}, silent=[104])
    assert not (out / "secure-sum-round-1.safetensors").exists()
    assert PrivacyLedger(out / "server-ledger.jsonl", level="user").entries == []


# ---------------------------------------------------------------- Flower's simulation engine


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    from shared.data.synthetic import write_planted_dataset
    from simulations.simulate import simulate

    root = tmp_path_factory.mktemp("secure-secagg")
    data = write_planted_dataset(root / "planted", n_users=5, n_items=90, n_clusters=3, interactions_per_user=20, seed=0)
    cfg = load_config(overrides={
        "dataset": str(data), "out": str(root / "run"), "cache-dir": str(root / "cache"), "num-rounds": 2,
        "eval-negatives": 49, "dp": "both", "trust-model": "secure", "secure-aggregation": True,
        "secagg-audit": True, "fault-drop-after-key-sharing": 2, "min-clients": 5, "user-delta": 1e-3,
        "secure-min-fraction": 0.8, "user-noise-multiplier": 1.0, "user-epsilon-budget": 20.0})
    return root / "run", cfg, simulate(cfg, log=lambda *_: None)


def test_secure_trust_over_secagg_on_the_simulation_engine(engine_run):
    from shared.privacy.report import collect
    from shared.privacy.verify import verify_run

    out, cfg, summary = engine_run
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["clients_aggregated"], r["clients_failed"]) for r in rounds] == [(4, 1), (4, 1)]
    entries = PrivacyLedger(out / "server-ledger.jsonl", level="user").entries
    assert [e.mechanism for e in entries] == ["ddg-secure-sum"] * 2
    assert all((e.details["survivors"], e.details["expected"]) == (4, 5) for e in entries)
    assert all(e.details["secure_aggregation"] == PROTOCOL for e in entries)
    for r in (1, 2):  # the protocol's sum is the direct modular sum of the shares the devices sent
        shares = [load_file(p)["share"].numpy() for p in sorted(out.glob(f"devices/*/share-round-{r}.safetensors"))]
        assert len(shares) == 4
        secure = load_file(out / f"secure-sum-round-{r}.safetensors")["modular-sum"].numpy()
        assert np.array_equal(secure, modular_sum(shares, cfg.secure_bits))
    assert 0 < summary["privacy"]["user_level"]["epsilon"] < float("inf")
    # Record-level DP on the devices too: their signed ledger heads travel in the SecAgg+ replies into the
    # manifest (one per device that trained: partition 2 leaves before training in both rounds), and verify
    # checks every device ledger against them.
    heads = json.loads((out / "audit-manifest.json").read_text())["device_heads"]
    ledgers = sorted(out.glob("devices/*/privacy-ledger.jsonl"))
    assert len(heads) == len(ledgers) == 4
    for path in ledgers:
        ledger = PrivacyLedger(path, level="record", public_key=(path.parent / "signing-key.pub").read_text().strip())
        assert [e.mechanism for e in ledger.entries].count("dp-sgd") == 2
        assert heads[ledger.public_key]["entries"] == len(ledger.entries)
        assert heads[ledger.public_key]["last_hash"] == ledger.entries[-1].hash
    v = verify_run(out)
    assert v.ok, v.problems
    assert len(v.devices) == 4
    facts = collect(out)
    assert facts["threat_model"]["trust_model"] == "secure" and facts["threat_model"]["secure_aggregation_ran"]
