"""Secure aggregation: the same rounds as server/app.py, but the server learns only the sum of what the
devices send, through Flower's SecAgg+ (which in Flower 1.41 runs only on the legacy strategy API:
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` with a `LegacyContext`). The masks come from
avrec's cryptographic PRG (`shared.privacy.masks`), installed before any round.

Every device weighs 1 (`num_examples = 1`, `max_weight = 1`), so the workflow hands the strategy the
mean over the N devices whose masked vectors arrived; times N that is the secure sum. Every available
device is sent every round: no sampling, no amplification claimed. Two mechanisms ride on it:

- trust-model central (`CentralNoise`): DP-FedAvg as without SecAgg. Devices send their clipped updates,
  SecAgg+ quantises each coordinate within [-user-clip-norm, user-clip-norm] to 2**`secagg-quantization-bits`
  levels with stochastic rounding, and the server adds Gaussian noise to the sum (`noised_mean`). The
  rounding inflates each device's sensitivity, so the ledger records the correspondingly smaller noise
  multiplier (`dp-fedavg-secagg`).
- trust-model secure (`DeviceShares`): devices send their distributed discrete Gaussian shares
  (`shared.secure.secagg_input`), which SecAgg+ carries exactly; the server recovers the modular sum
  (`secagg_total`) and decodes it with the same `SecureRound` as the simulation path, under the same
  dropout rule and with the same ledger entry (`ddg-secure-sum`, plus the protocol).

Either way N x 2**bits must stay below Flower's modulus 2**32, or the sum wraps: such a round is refused
(`shared.privacy.secagg_plan`).
"""

from __future__ import annotations

import secrets
import time
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from safetensors.torch import save_file

from server.aggregate import Aggregate, ServerOptimizer, noised_mean, server_lr
from server.app import (
    budget_exhausted,
    epsilon_after,
    keep_heads,
    open_user_ledger,
    record_user_round,
    round_facts,
    sign_manifest,
    user_round_event,
)
from server.checkpoint import refuse_existing
from server.records import RunRecorder
from server.secure_sum import SecureRound
from shared.config import RunConfig
from shared.privacy.accounting import SampledGaussian
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.participation import user_epsilon
from shared.privacy.masks import PRG_NAME, install as install_secure_masks
from shared.privacy.secagg_plan import (FLOWER_MODULUS, SecAggPlan, SecAggRangeError, effective_noise_multiplier,
                                        effective_sensitivity, plan)
from shared.secure import ShareError, dimension, secagg_ranges, secagg_total

USER_NEIGHBOURING = "add or remove one device (all data on it)"
PROTOCOL = "secagg+ (cryptographic PRG masks)"  # what the ledger records: Flower's SecAgg+ with avrec's PRG


class CentralNoise:
    """trust-model central: SecAgg+ sums the clipped, quantised updates; the server adds the Gaussian noise."""

    def __init__(self, cfg: RunConfig, initial: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.bits = cfg.secagg_quantization_bits
        self.clipping_range, self.quantization_range = cfg.user_clip_norm, 2**self.bits
        # Rounding inflates one device's sensitivity from C to C + sqrt(d) * step whatever the device count.
        self.dimension = dimension(initial)
        unit = plan(1, self.bits, cfg.user_clip_norm)
        self.sensitivity = effective_sensitivity(unit, self.dimension)
        self.noise_multiplier = effective_noise_multiplier(cfg.user_noise_multiplier, unit, self.dimension)
        self.denominator = 0.0

    def describe(self) -> str:
        return (f"dp=user, server noise; rounding makes the sensitivity {self.sensitivity:.6g} (clip "
                f"{self.cfg.user_clip_norm:g}), accounted noise multiplier {self.noise_multiplier:.6g}")

    def plan_round(self, devices: int, global_state: dict[str, torch.Tensor]) -> dict[str, Scalar]:
        self.denominator = float(devices)
        return {}

    def event(self) -> SampledGaussian:
        return SampledGaussian(self.noise_multiplier, 1.0, 1)

    def secure_sum(self, mean: list[np.ndarray], n: int, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float64) * n) for k, a in zip(keys, mean)}

    def aggregate(self, total: dict[str, torch.Tensor], n: int, global_state: dict[str, torch.Tensor]) -> Aggregate:
        cfg = self.cfg
        return Aggregate(noised_mean(total, global_state, cfg.user_clip_norm, cfg.user_noise_multiplier,
                                     self.denominator), n)

    def record(self, ledger: PrivacyLedger, server_round: int, result: Aggregate, facts: dict, secagg: SecAggPlan) -> None:
        cfg = self.cfg
        ledger.append(
            level="user", round=server_round, mechanism="dp-fedavg-secagg",
            noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1, clip_norm=cfg.user_clip_norm,
            sampling="all-clients", amplification=False, neighbouring=USER_NEIGHBOURING,
            details={"population": facts["population"], "participants": facts["participants"], "aggregated": result.accepted,
                     "dropped": facts["sampled"] - result.accepted, "denominator": self.denominator,
                     "secure_aggregation": PROTOCOL, "num_shares": cfg.secagg_num_shares,
                     "reconstruction_threshold": cfg.secagg_reconstruction_threshold,
                     # accounted: noise std (configured sigma x C) over the rounded update's sensitivity
                     "configured_noise_multiplier": cfg.user_noise_multiplier,
                     "noise_std": cfg.user_noise_multiplier * cfg.user_clip_norm,
                     "secagg": secagg.details(self.dimension, result.accepted)},
        )


class DeviceShares:
    """trust-model secure: SecAgg+ sums the devices' DDG shares (integers in [0, 2**secure-bits)) exactly; the
    server decodes only that modular sum, as `SecureRound` does in simulation."""

    def __init__(self, cfg: RunConfig, initial: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.bits = cfg.secure_bits
        self.clipping_range, self.quantization_range = secagg_ranges(self.bits)
        self.round: SecureRound | None = None  # this round's, set in plan_round

    def describe(self) -> str:
        return f"trust-model=secure: devices' discrete Gaussian shares mod 2^{self.bits}, no server noise"

    def plan_round(self, devices: int, global_state: dict[str, torch.Tensor]) -> dict[str, Scalar]:
        self.round = SecureRound.plan_round(self.cfg, devices, global_state)
        return self.round.config()

    def event(self):
        return user_round_event(self.cfg, self.round, 1.0)

    def secure_sum(self, mean: list[np.ndarray], n: int, keys: list[str]) -> dict[str, torch.Tensor]:
        (vector,) = mean
        return {"modular-sum": torch.from_numpy(secagg_total(vector, n, self.bits))}

    def aggregate(self, total: dict[str, torch.Tensor], n: int, global_state: dict[str, torch.Tensor]) -> Aggregate:
        return self.round.decode(total["modular-sum"].numpy(), n, global_state)

    def record(self, ledger: PrivacyLedger, server_round: int, result: Aggregate, facts: dict, secagg: SecAggPlan) -> None:
        carried = {"modulus": secagg.modulus, "quantization_range": secagg.quantization_range,
                   "max_devices": secagg.max_devices, "planned_devices": secagg.devices,
                   "num_shares": self.cfg.secagg_num_shares,
                   "reconstruction_threshold": self.cfg.secagg_reconstruction_threshold,
                   "encoding": "share k sent as k - 2^(bits-1), quantised back to exactly k (no rounding)"}
        record_user_round(ledger, self.cfg, server_round, self.event(), result.accepted, {**facts, "secagg": carried},
                          self.round, PROTOCOL)


class SecAggFedAvg(FedAvg):
    """Receives only the unmasked mean of the round's vectors; the mechanism turns it into the step."""

    def __init__(self, cfg: RunConfig, initial: dict[str, torch.Tensor], out: Path) -> None:
        self.cfg = cfg
        self.keys = list(initial)
        self.global_state = initial
        self.mechanism = DeviceShares(cfg, initial) if cfg.secure_trust else CentralNoise(cfg, initial)
        self.optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate, momentum=cfg.server_momentum)
        self.recorder = RunRecorder(out)
        self.key, self.ledger = open_user_ledger(cfg, out)  # cfg validation: SecAgg+ needs user-level DP
        self.chosen: dict[str, int] = {}
        self.device_heads: dict[str, dict] = {}  # the latest signed ledger head per device key, for the manifest
        self.out = out
        self.run_id = secrets.token_hex(8)  # devices order their ledger's rounds within it (server/checkpoint.py)
        self.started = time.perf_counter()
        self.plan: SecAggPlan | None = None  # this round's, set in configure_fit
        self.participants: list[int] = []
        self.refused = False
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.min_clients, min_evaluate_clients=0,
            min_available_clients=cfg.min_clients, accept_failures=True,
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in initial.values()]),
            on_fit_config_fn=lambda r: {"server-round": r, "run-id": self.run_id, "keys": "\n".join(self.keys)},
        )

    def refuse(self, when: str, exc: SecAggRangeError) -> None:
        """Stop the run: parameters under which the secure sum can wrap are never used."""
        log(ERROR, "avrec: SecAgg+ %s refused: %s", when, exc)
        self.refused = True
        self.recorder.stopped(f"SecAgg+ {when} refused: {exc}")

    def configure_fit(self, server_round, parameters, client_manager):
        if self.refused:
            return []  # a refused run stays stopped
        self.started = time.perf_counter()
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.participants = sorted(int(proxy.cid) for proxy, _ in instructions)
        try:  # every instructed device may send a masked vector: all of them count towards the wrap
            self.plan = plan(len(instructions), self.mechanism.bits, self.mechanism.clipping_range)
        except SecAggRangeError as exc:
            self.refuse(f"round {server_round}", exc)
            return []
        extra = self.mechanism.plan_round(len(instructions), self.global_state)
        after = epsilon_after(self.ledger, self.mechanism.event(), self.participants, False, self.cfg.user_delta)
        if budget_exhausted(self.recorder, self.cfg, after, server_round):
            return []  # no instructions: the workflow cancels the round
        for _, fit_ins in instructions:
            fit_ins.config.update(extra)
        return instructions

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        n = len(results)
        sampled = len(self.participants)
        result = Aggregate(None, 0, ["no masked vector arrived"])
        sent_state = self.global_state  # what this round's devices ranked with (the step makes a new dict)
        if n:
            # Every FitRes carries the same unmasked mean (the workflow's backward compatibility).
            try:
                total = self.mechanism.secure_sum(parameters_to_ndarrays(results[0][1].parameters), n, self.keys)
            except ShareError as exc:
                result = Aggregate(None, 0, [str(exc)])
            else:
                if self.cfg.secagg_audit:  # the server's own copy of what it learnt, for tests and benchmarks
                    save_file(total, str(self.out / f"secure-sum-round-{server_round}.safetensors"))
                result = self.mechanism.aggregate(total, n, self.global_state)
        if result.delta is not None:
            self.global_state = self.optimizer.step(self.global_state, result.delta, server_lr(self.cfg, server_round))
            facts = round_facts(self.cfg, sampled, sampled, self.participants, float(sampled), False)
            self.mechanism.record(self.ledger, server_round, result, {**facts, "fraction": 1.0}, self.plan)
            if self.cfg.secagg_audit:
                decoded = {k: v.double() * float(sampled) for k, v in result.delta.items()}
                save_file(decoded, str(self.out / f"decoded-sum-round-{server_round}.safetensors"))
        for node in self.participants:  # every device sent the round is charged for it, as in server/app.py
            self.chosen[str(node)] = self.chosen.get(str(node), 0) + 1
        metrics = [keep_heads(self.device_heads, res.metrics, f"round {server_round}, node {proxy.cid}")
                   for proxy, res in results]
        self.recorder.round(
            server_round, [{k: float(v) for k, v in m.items()} for m in metrics],
            seconds=time.perf_counter() - self.started, sampled=sampled, aggregated=result.accepted,
            declined=[], rejected=result.rejected,
            failed=[f"a device sent no masked vector (dropped out; {len(failures)} failure record(s))"] * (sampled - n),
            user_epsilon=user_epsilon(self.ledger.entries, self.cfg.user_delta).epsilon,
        )
        self.recorder.checkpoint(self.global_state, sent_state)
        log(INFO, "%s", self.recorder.progress_line())
        return ndarrays_to_parameters([v.numpy() for v in self.global_state.values()]), {}


def secagg_workflow(cfg: RunConfig, mechanism: CentralNoise | DeviceShares) -> DefaultWorkflow:
    return DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares,
        reconstruction_threshold=cfg.secagg_reconstruction_threshold,
        max_weight=1.0,  # = each device's weight: its factor is exactly 2**bits (secagg_plan)
        clipping_range=mechanism.clipping_range,
        quantization_range=mechanism.quantization_range,
        modulus_range=FLOWER_MODULUS,
    ))


def run_secure(grid: Grid, context: Context, cfg: RunConfig, initial: dict[str, torch.Tensor]) -> None:
    install_secure_masks()  # before any mask is drawn or removed: devices use the same PRG (client/secagg.py)
    out = Path(cfg.out)
    refuse_existing(out)
    strategy = SecAggFedAvg(cfg, initial, out)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
    log(INFO, "avrec: secure aggregation (SecAgg+, %d shares, threshold %d, masks %s), %d rounds, %s",
        cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold, PRG_NAME, cfg.num_rounds,
        strategy.mechanism.describe())
    try:  # before any round: the devices the run waits for, or already has, must not wrap the sum
        plan(max(cfg.min_clients, len(list(grid.get_node_ids()))), strategy.mechanism.bits,
             strategy.mechanism.clipping_range)
    except SecAggRangeError as exc:
        strategy.refuse("run", exc)
    else:
        secagg_workflow(cfg, strategy.mechanism)(grid, legacy)
    sign_manifest(out, strategy.key, strategy.ledger, cfg, len(strategy.recorder.rounds), strategy.device_heads,
                  strategy.chosen,
                  strategy.run_id)
    strategy.recorder.finish(cfg)
