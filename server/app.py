"""The Flower ServerApp: samples clients, aggregates their shared-weight updates, keeps the signed
user-level privacy ledger, records every round, checkpoints the global model and signs the run's audit
manifest."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server import checkpoint
from server.aggregate import Robust, ServerOptimizer, aggregate, sample_clients, server_lr
from server.records import RunFailed, RunRecorder
from server.secure_sum import SecureRound
from shared.config import ConfigError, RunConfig, from_flat
from shared.data.resolve import resolve_dataset
from shared.features import EncoderSettings, catalogue_shapes, placeholder_content
from shared.model import build_model, shared_state
from shared.privacy.accounting import SampledGaussian
from shared.privacy.device_heads import HEADS_RECORD, PREFIX as HEADS_PREFIX, HeadError, split_heads
from shared.privacy.distributed_dp import NEIGHBOURING as SECURE_NEIGHBOURING
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.manifest import code_digest, config_digest, write_manifest
from shared.privacy.participation import (
    EVERYONE,
    DDGRound,
    client_histories,
    history_epsilon,
    participation,
    user_epsilon,
)
from shared.privacy.signing import load_or_create_key
from shared.secure import MECHANISM as SECURE_SUM

app = ServerApp()

USER_NEIGHBOURING = "add or remove one user (all of a client's data)"


def initial_model(cfg: RunConfig, dataset_dir: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    n_items, dims = catalogue_shapes(dataset_dir, cfg.modality_list, EncoderSettings.from_config(cfg))
    return shared_state(build_model(placeholder_content(n_items, dims), n_items, cfg))


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of the {minimum} nodes (min-clients) connected within {timeout:.0f} s"
            )
        time.sleep(1.0)
    return nodes


def open_user_ledger(cfg: RunConfig, out: Path) -> tuple[Ed25519PrivateKey, PrivacyLedger | None]:
    """The server's signing key and, under user-level DP, its signed ledger (reopened across runs)."""
    key = load_or_create_key(cfg.server_key_dir or out / "server")
    ledger = PrivacyLedger(out / "server-ledger.jsonl", level="user", signer=key) if cfg.user_dp else None
    return key, ledger


def sign_manifest(
    out: Path, key: Ed25519PrivateKey, ledger: PrivacyLedger | None, cfg: RunConfig, rounds_run: int,
    device_heads: dict[str, dict], chosen: dict[str, int], run_id: str,
) -> None:
    """The run's signed audit manifest: ledger head, devices' last signed heads, participation, digests, and the
    run's id (which its devices' ledger entries carry)."""
    write_manifest(out, key, {
        "server_ledger": {"entries": len(ledger.entries), "last_hash": ledger.entries[-1].hash if ledger.entries else ""}
        if ledger is not None else None,
        "device_heads": device_heads,
        "participation": {n: c for n, c in sorted(chosen.items())},
        "config_sha256": config_digest(cfg.to_flat()),
        "code_sha256": code_digest(),
        "rounds_run": rounds_run,
        "run_id": run_id,
    })


def keep_heads(device_heads: dict[str, dict], fields, source: str) -> dict:
    """Keep the signed ledger heads among a reply's `fields` (the latest per device key) for the manifest; return
    the other fields. A head that is malformed or not signed by its key is not kept (the device's ledger then
    fails `avrec audit verify`), and the reason is logged."""
    try:
        heads, rest = split_heads(fields)
    except HeadError as exc:
        log(WARNING, "avrec: %s: %s; its heads are not recorded", source, exc)
        return {k: v for k, v in fields.items() if not k.startswith(HEADS_PREFIX)}
    device_heads.update(heads)
    return rest


def round_facts(cfg: RunConfig, population: int, eligible: int, sampled: list[int], denominator: float,
                random_sample: bool) -> dict:
    """What every user-level ledger entry records about the round's sampling."""
    return {"population": population, "eligible": eligible, "sampled": len(sampled), "denominator": denominator,
            "fraction": cfg.fraction_train, "participants": sorted(sampled),
            "max_rounds_per_client": cfg.max_rounds_per_client, "min_round_separation": cfg.min_round_separation,
            "sampling_source": "secrets.SystemRandom (OS CSPRNG)" if random_sample else "none"}


def user_round_event(cfg: RunConfig, secure_round: SecureRound | None, rate: float) -> SampledGaussian | DDGRound:
    """What one round charges: under trust-model secure the DDG round with the fewest shares it still decodes
    (the worst case the round allows), else DP-FedAvg's Gaussian."""
    if secure_round is not None:
        return DDGRound(secure_round.plan, secure_round.min_survivors, rate)
    return SampledGaussian(cfg.user_noise_multiplier, rate, 1)


def epsilon_after(ledger: PrivacyLedger, event, sampled: list[int], random_sample: bool, delta: float) -> float:
    """The largest user-level epsilon (RDP bound) of a client charged for `event` on top of its history."""
    histories = client_histories(ledger.entries)
    charged = histories.values() if random_sample else {histories.get(str(n), histories[EVERYONE]) for n in sampled}
    return max((history_epsilon([*h, event], delta, fast=True).epsilon for h in set(charged)), default=0.0)


def budget_exhausted(recorder: RunRecorder, cfg: RunConfig, after: float, server_round: int) -> bool:
    """Stop the run (once) when the round would take the user-level epsilon over the budget."""
    if after <= cfg.user_epsilon_budget:
        return False
    if not recorder.stop_reason:
        log(WARNING, "avrec: stopping before round %d: user-level epsilon would reach %.3f (RDP bound, delta %g) "
            "over the budget %g", server_round, after, cfg.user_delta, cfg.user_epsilon_budget)
        recorder.stopped(f"user-level budget {cfg.user_epsilon_budget} reached before round {server_round}")
    return True


def record_user_round(ledger: PrivacyLedger, cfg: RunConfig, server_round: int, event, aggregated: int, facts: dict,
                      secure_round: SecureRound | None = None, secure_aggregation: str = "") -> None:
    """The round's user-level ledger entry: a DDG secure sum (trust-model secure, with the shares actually
    summed, and the protocol that summed them) or DP-FedAvg with the server's noise."""
    amplified = event.sample_rate < 1.0
    common = dict(level="user", round=server_round, noise_multiplier=cfg.user_noise_multiplier,
                  sample_rate=event.sample_rate, steps=1, clip_norm=cfg.user_clip_norm,
                  sampling="poisson-csprng" if amplified else "all-clients", amplification=amplified,
                  neighbouring=USER_NEIGHBOURING)
    if secure_round is not None:
        ledger.append(mechanism=SECURE_SUM, **{**common, "neighbouring": SECURE_NEIGHBOURING},
                      details={**secure_round.ledger_details(aggregated, secure_aggregation), **facts})
    else:
        ledger.append(mechanism="dp-fedavg", **common, details={**facts, "aggregated": aggregated, "trust_model": "central"})


def schedule_allows(cfg: RunConfig, rounds_so_far: int, last: int | None, server_round: int) -> bool:
    """The cap on rounds per client and their minimum separation (used only without amplification)."""
    if cfg.max_rounds_per_client and rounds_so_far >= cfg.max_rounds_per_client:
        return False
    return last is None or server_round - last >= cfg.min_round_separation


def send_and_receive(grid: Grid, messages: list[Message], in_flight: int, poll_seconds: float = 0.05,
                     progress: Callable[[int, int, float], None] | None = None,
                     progress_seconds: float = 0.0) -> list[Message]:
    """The replies to `messages`, keeping at most `in_flight` (0 = all) of them sent and unanswered, and
    sending the next as each reply arrives. Like `Grid.send_and_receive`, it waits until every message has
    a reply (Flower answers an unreachable node with an error reply). `progress(replies, asked, seconds)`
    is called at most every `progress_seconds` while replies are outstanding."""
    in_flight = in_flight or len(messages)
    queue, waiting, replies = list(reversed(messages)), set(), []
    started = shown = time.perf_counter()
    while queue or waiting:
        if progress is not None and progress_seconds > 0 and time.perf_counter() - shown >= progress_seconds:
            shown = time.perf_counter()
            progress(len(replies), len(messages), shown - started)
        if queue and len(waiting) < in_flight:
            batch = [queue.pop() for _ in range(min(in_flight - len(waiting), len(queue)))]
            waiting.update(grid.push_messages(batch))
        received = list(grid.pull_messages(list(waiting)))
        replies += received
        waiting -= {r.metadata.reply_to_message_id for r in received}
        if not received:
            time.sleep(poll_seconds)
    return replies


def round_progress(server_round: int) -> Callable[[int, int, float], None]:
    """A log line on how far a round is: Flower streams the ServerApp's log to the user's terminal."""
    def show(done: int, asked: int, seconds: float) -> None:
        left = f"~{seconds / done * (asked - done):.0f} s left" if done else "no reply yet"
        log(INFO, "avrec: round %d: %d/%d devices answered, %.0f s elapsed, %s", server_round, done, asked, seconds, left)
    return show


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_flat(context.run_config)
    if cfg.attack != "none":  # simulated hostile clients exist only in the in-process engine's harness
        raise ConfigError(f"attack = {cfg.attack}: attacks are simulated by the in-process engine only "
                          "(avrec simulate --engine inprocess)")
    if cfg.secure_aggregation:
        from server.secagg import run_secure

        run_secure(grid, context, cfg, initial_model(cfg, str(resolve_dataset(cfg))))
        return
    run(grid, cfg, str(resolve_dataset(cfg)))


def run(grid: Grid, cfg: RunConfig, dataset_dir: str) -> None:
    out = Path(cfg.out)
    optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate, momentum=cfg.server_momentum)
    state, global_state = checkpoint.begin(out, cfg, optimizer, lambda: initial_model(cfg, dataset_dir))
    recorder = RunRecorder(out, state.rounds)
    key, ledger = open_user_ledger(cfg, out)
    if ledger is not None:  # the ledger is the record of who was charged (it may be a round past the checkpoint)
        state.chosen = dict(participation(ledger.entries))
        state.last_round = {str(n): e.round for e in ledger.entries for n in e.details.get("participants", ())}
    chosen, last_round, device_heads = state.chosen, state.last_round, state.device_heads
    nodes = wait_for_nodes(grid, cfg.min_clients)
    names = checkpoint.client_names(state, nodes, cfg.fraction_train)  # node id -> client name in the records
    start = checkpoint.first_round(state, ledger)
    log(INFO, "avrec: %d clients, rounds %d to %d, dp=%s", len(nodes), start, cfg.num_rounds, cfg.dp)
    for server_round in range(start, cfg.num_rounds + 1):
        started = time.perf_counter()
        nodes = list(grid.get_node_ids())
        names.update({n: n for n in nodes if n not in names})  # a node that joined since
        eligible = [n for n in nodes
                    if schedule_allows(cfg, chosen.get(str(names[n]), 0), last_round.get(str(names[n])), server_round)]
        sampled, random_sample = sample_clients(eligible, cfg.fraction_train)
        if not sampled and not random_sample:
            if all(not schedule_allows(cfg, chosen.get(str(names[n]), 0), None, server_round) for n in nodes):
                recorder.stopped(f"every client has taken part in max-rounds-per-client = {cfg.max_rounds_per_client} rounds")
                break
            log(INFO, "avrec: round %d skipped: no client is min-round-separation = %d rounds past its last round",
                server_round, cfg.min_round_separation)
            continue
        # The fixed DP-FedAvg denominator: the expected sample, or the server's own (data-independent) choice
        expected = cfg.fraction_train * len(nodes) if random_sample else len(sampled)
        user_event = None
        round_config: dict = {"server-round": server_round, "run-id": state.run_id}
        secure_round = None
        if ledger is not None:
            # Amplification is claimed only for Poisson sampling from the OS CSPRNG.
            if cfg.secure_trust:
                secure_round = SecureRound.plan_round(cfg, expected, global_state)
                round_config.update(secure_round.config())
            user_event = user_round_event(cfg, secure_round, cfg.fraction_train if random_sample else 1.0)
            after = epsilon_after(ledger, user_event, [names[n] for n in sampled], random_sample, cfg.user_delta)
            if budget_exhausted(recorder, cfg, after, server_round):
                break
        sent_state = global_state  # what this round's devices evaluate (the step below makes a new dict)
        content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord(round_config)})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]
        replies = send_and_receive(grid, messages, cfg.messages_in_flight, progress=round_progress(server_round),
                                   progress_seconds=cfg.progress_seconds)

        updates, shares, metric_rows, declined, failed = [], [], [], [], []
        for reply in replies:
            source = f"node {reply.metadata.src_node_id}"
            if reply.has_error():
                failed.append(f"{source}: {reply.error.reason}")
                continue
            metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
            if "harness" in reply.content:  # a simulated device's evaluation (client/app.py)
                metrics.update(reply.content["harness"])
            metric_rows.append(metrics)
            if secure_round is not None and "arrays" in reply.content:
                # a device that declined still sends its noise share (of a zero update)
                shares.append((source, reply.content["arrays"].to_torch_state_dict()["share"]))
            if metrics.get("declined"):
                declined.append(f"{source}: {reply.content['config'].get('reason', '')}" if "config" in reply.content else source)
                continue
            if secure_round is None:
                updates.append((source, reply.content["arrays"].to_torch_state_dict()))
        for reply in replies:
            if not reply.has_error() and HEADS_RECORD in reply.content:  # one per user on the device
                keep_heads(device_heads, reply.content[HEADS_RECORD],
                           f"round {server_round}, node {reply.metadata.src_node_id}")
        failed += [f"node {n}: no reply" for n in set(sampled) - {r.metadata.src_node_id for r in replies}]
        ray_nodes = Counter(str(r.content["harness-ray-node"]["id"]) for r in replies  # where they ran (client/app.py)
                            if not r.has_error() and "harness-ray-node" in r.content)

        if secure_round is not None:
            result = secure_round.aggregate(shares, global_state)
        else:
            result = aggregate(
                updates, global_state, user_dp=cfg.user_dp, clip_norm=cfg.user_clip_norm,
                noise_multiplier=cfg.user_noise_multiplier, expected_clients=expected, robust=Robust.from_config(cfg),
            )
        if result.delta is not None:
            global_state = optimizer.step(global_state, result.delta, server_lr(cfg, server_round))
            if ledger is not None:
                facts = round_facts(cfg, len(nodes), len(eligible), [names[n] for n in sampled], expected, random_sample)
                record_user_round(ledger, cfg, server_round, user_event, result.accepted, facts, secure_round)
        for n in sampled:
            chosen[str(names[n])] = chosen.get(str(names[n]), 0) + 1
            last_round[str(names[n])] = server_round
        recorder.round(
            server_round,
            metric_rows,
            seconds=time.perf_counter() - started,
            sampled=len(sampled),
            aggregated=result.accepted,
            declined=declined,
            rejected=result.rejected,
            failed=failed,
            ray_nodes=dict(sorted(ray_nodes.items())),
            user_epsilon=user_epsilon(ledger.entries, cfg.user_delta).epsilon if ledger is not None else None,
        )
        recorder.checkpoint(global_state, sent_state)
        state.round, state.rounds, state.clients = server_round, recorder.rounds, [names[n] for n in nodes]
        checkpoint.save(out, state, global_state, {"m": optimizer.m, "v": optimizer.v})
        for reason in (declined + result.rejected + failed)[:3] + result.notes:
            log(WARNING, "avrec: round %d: %s", server_round, reason)
        log(INFO, "%s", recorder.progress_line())
        if sampled and len(declined) == len(sampled):  # a designed end, not a failure
            recorder.stopped(f"every client sent round {server_round} declined: their record-level budgets are spent")
            break
    sign_manifest(out, key, ledger, cfg, len(recorder.rounds), device_heads, chosen, state.run_id)
    finished = recorder.finish(cfg)
    log(INFO, "avrec: results in %s", out / "federated.json")
    if finished["failure"]:
        log(ERROR, "avrec: the run failed: %s", finished["failure"])
        raise RunFailed(finished["failure"])
