"""Secure aggregation: the same round as server/app.py, but the server learns only the sum of the
devices' updates, through Flower's SecAgg+ (which in Flower 1.41 runs only on the legacy strategy API:
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` with a `LegacyContext`).

Every device weighs 1 (`num_examples = 1`, `max_weight = 1`), so the workflow hands the strategy the
mean over the devices whose masked vectors arrived; times their count that is the secure sum. User-level
DP is DP-FedAvg as without SecAgg: updates clipped to `user-clip-norm` on the device, Gaussian noise
added to the sum here (`server.aggregate.noised_mean`), a fixed denominator, one ledger entry per round.
SecAgg+ quantises each coordinate within [-user-clip-norm, user-clip-norm] (a clipped update lies there)
to 2**`secagg-quantization-bits` levels with stochastic rounding, and sums modulo 2**32: a round whose
devices x 2**bits reaches that wraps, so it is refused (`shared.privacy.secagg_plan`), and the rounding
inflates each device's sensitivity, so the ledger records the correspondingly smaller noise multiplier.
"""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from safetensors.torch import save_file

from server.aggregate import ServerOptimizer, noised_mean
from server.app import open_user_ledger, sign_manifest
from server.records import RunRecorder
from shared.config import RunConfig
from shared.privacy.accounting import SampledGaussian, epsilon
from shared.privacy.secagg_plan import (FLOWER_MODULUS, SecAggPlan, SecAggRangeError, effective_noise_multiplier,
                                        effective_sensitivity, plan)

USER_NEIGHBOURING = "add or remove one device (all data on it)"


class SecureDPFedAvg(FedAvg):
    """Receives only the unmasked mean of the round's updates; adds DP noise to the sum and steps."""

    def __init__(self, cfg: RunConfig, initial: dict[str, torch.Tensor], out: Path) -> None:
        self.cfg = cfg
        self.keys = list(initial)
        self.global_state = initial
        self.optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate)
        self.recorder = RunRecorder(out)
        self.key, self.ledger = open_user_ledger(cfg, out)  # cfg validation: SecAgg+ needs user-level DP
        self.chosen: dict[str, int] = {}
        self.out = out
        self.started = time.perf_counter()
        # Rounding inflates one device's sensitivity from C to C + sqrt(d) * step whatever the device count.
        self.dimension = sum(int(v.numel()) for v in initial.values())
        unit = plan(1, cfg.secagg_quantization_bits, cfg.user_clip_norm)
        self.sensitivity = effective_sensitivity(unit, self.dimension)
        self.noise_multiplier = effective_noise_multiplier(cfg.user_noise_multiplier, unit, self.dimension)
        self.plan: SecAggPlan | None = None  # this round's, set in configure_fit
        self.refused = False
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.min_clients, min_evaluate_clients=0,
            min_available_clients=cfg.min_clients, accept_failures=True,
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in initial.values()]),
            on_fit_config_fn=lambda r: {"server-round": r, "keys": "\n".join(self.keys)},
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
        self.sampled = client_manager.num_available()
        cfg = self.cfg
        after = epsilon([*self.ledger.events(), SampledGaussian(self.noise_multiplier, 1.0, 1)], cfg.user_delta,
                        accountant="rdp-fast")
        if after > cfg.user_epsilon_budget:  # no instructions: the workflow cancels the round
            if not self.recorder.stop_reason:
                log(WARNING, "avrec: stopping before round %d: user-level epsilon would reach %.3f (RDP bound, delta %g) "
                    "over the budget %g", server_round, after, cfg.user_delta, cfg.user_epsilon_budget)
                self.recorder.stopped(f"user-level budget {cfg.user_epsilon_budget} reached before round {server_round}")
            return []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        try:  # every instructed device may send a masked vector: all of them count towards the wrap
            self.plan = plan(len(instructions), cfg.secagg_quantization_bits, cfg.user_clip_norm)
        except SecAggRangeError as exc:
            self.refuse(f"round {server_round}", exc)
            return []
        return instructions

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        cfg = self.cfg
        n = len(results)
        # Every FitRes carries the same unmasked mean (the workflow's backward compatibility).
        mean = parameters_to_ndarrays(results[0][1].parameters) if n else [np.zeros_like(v.numpy()) for v in self.global_state.values()]
        total = {k: torch.from_numpy(np.asarray(a, dtype=np.float64) * n) for k, a in zip(self.keys, mean)}
        if cfg.secagg_audit:
            save_file({k: v.contiguous() for k, v in total.items()}, str(self.out / f"secure-sum-round-{server_round}.safetensors"))
        # Every available device is sent the round (fraction 1): no sampling, no amplification claimed.
        expected = float(self.sampled)
        delta = noised_mean(total, self.global_state, cfg.user_clip_norm, cfg.user_noise_multiplier, expected)
        self.global_state = self.optimizer.step(self.global_state, delta)
        self.ledger.append(
            level="user", round=server_round, mechanism="dp-fedavg-secagg",
            noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1, clip_norm=cfg.user_clip_norm,
            sampling="all-clients", amplification=False, neighbouring=USER_NEIGHBOURING,
            details={"population": self.sampled, "aggregated": n, "dropped": self.sampled - n, "denominator": expected,
                     "secure_aggregation": "secagg+", "num_shares": cfg.secagg_num_shares,
                     "reconstruction_threshold": cfg.secagg_reconstruction_threshold,
                     # accounted: noise std (configured sigma x C) over the rounded update's sensitivity
                     "configured_noise_multiplier": cfg.user_noise_multiplier,
                     "noise_std": cfg.user_noise_multiplier * cfg.user_clip_norm,
                     "secagg": self.plan.details(self.dimension, n)},
        )
        for proxy, _ in results:
            self.chosen[proxy.cid] = self.chosen.get(proxy.cid, 0) + 1
        rows = [{k: float(v) for k, v in res.metrics.items()} for _, res in results]
        self.recorder.round(
            server_round, rows, seconds=time.perf_counter() - self.started, sampled=self.sampled, aggregated=n,
            declined=[], rejected=[],
            failed=[f"a device sent no masked vector (dropped out; {len(failures)} failure record(s))"] * (self.sampled - n),
            user_epsilon=self.ledger.epsilon(cfg.user_delta).epsilon,
        )
        self.recorder.checkpoint(self.global_state)
        log(INFO, "%s", self.recorder.progress_line())
        return ndarrays_to_parameters([v.numpy() for v in self.global_state.values()]), {}


def run_secure(grid: Grid, context: Context, cfg: RunConfig, initial: dict[str, torch.Tensor]) -> None:
    out = Path(cfg.out)
    strategy = SecureDPFedAvg(cfg, initial, out)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=cfg.secagg_num_shares,
            reconstruction_threshold=cfg.secagg_reconstruction_threshold,
            max_weight=1.0,  # = each device's weight: its factor is exactly 2**bits (secagg_plan)
            clipping_range=cfg.user_clip_norm,
            quantization_range=2**cfg.secagg_quantization_bits,
            modulus_range=FLOWER_MODULUS,
        )
    )
    log(INFO, "avrec: secure aggregation (SecAgg+, %d shares, threshold %d), %d rounds, dp=%s; rounding makes the "
        "sensitivity %.6g (clip %g), accounted noise multiplier %.6g", cfg.secagg_num_shares,
        cfg.secagg_reconstruction_threshold, cfg.num_rounds, cfg.dp, strategy.sensitivity, cfg.user_clip_norm,
        strategy.noise_multiplier)
    try:  # before any round: the devices the run waits for, or already has, must not wrap the sum
        plan(max(cfg.min_clients, len(list(grid.get_node_ids()))), cfg.secagg_quantization_bits, cfg.user_clip_norm)
    except SecAggRangeError as exc:
        strategy.refuse("run", exc)
    else:
        workflow(grid, legacy)
    # SecAgg+ rounds carry no device ledger heads (client/secagg.py): the manifest lists none.
    sign_manifest(out, strategy.key, strategy.ledger, cfg, len(strategy.recorder.rounds), {}, strategy.chosen)
    strategy.recorder.finish(cfg)
