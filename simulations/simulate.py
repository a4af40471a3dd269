"""`avrec simulate`: a federated run on one machine, next to the baselines, with its privacy figures.

1. resolve the dataset, split it, and embed the item content once into the on-device cache;
2. run the Flower app on the simulation engine (`simulations.engine`), every selected user a client;
3. evaluate popularity and the same towers trained centrally without DP on the same split;
4. compute each device's record-level epsilon from its own ledger, and the server's user-level one;
5. write `summary.json` and print the table.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from server.checkpoint import refuse_existing
from server.records import RunFailed
from shared.config import ConfigError, RunConfig
from shared.errors import read_json
from shared.data.dataset import load_dataset
from shared.data.resolve import resolve_dataset
from shared.data.signals import run_split
from shared.features import EncoderSettings, item_content
from shared.metrics import METRICS, PROTOCOLS
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.participation import user_epsilon
from simulations import baselines
from simulations.engine import EngineError, TreeMemory, check_ray_address, run_app
from simulations.inprocess import run_inprocess
from simulations.served_lists import served_lists, table_lines

PACKAGES = ("avrec", "torch", "flwr", "ray", "opacus", "dp-accounting", "transformers", "numpy", "pandas")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def record_epsilons(state_dir: Path, delta: float) -> dict[str, Any]:
    """Record-level epsilon of every device, recomputed from the mechanisms in its ledger."""
    cache: dict[tuple, float] = {}
    values = []
    for path in sorted(state_dir.glob("*/privacy-ledger.jsonl")):
        ledger = PrivacyLedger(path, level="record")
        events = tuple(ledger.events())
        if events not in cache:
            cache[events] = ledger.epsilon(delta).epsilon
        values.append(cache[events])
    if not values:
        return {"clients": 0}
    values.sort()
    return {
        "clients": len(values),
        "delta": delta,
        "median": statistics.median(values),
        "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
        "max": values[-1],
        "accountant": "PLD (dp-accounting), cross-checked with PRV and RDP (opacus)",
    }


ENGINES = ("flower", "inprocess")


def simulate(cfg: RunConfig, log=print, engine: str = "flower", with_baselines: bool = True,
             ray_address: str | None = None) -> dict[str, Any]:
    """`engine`: "flower" (Flower's simulation engine, a process per device message) or "inprocess" (the same
    server loop and device code in this process, devices batched: simulations/inprocess.py).
    `with_baselines`: also popularity and the towers trained centrally without DP (the frontier runs them once).
    `ray_address`: HOST:PORT of an existing Ray cluster whose nodes run Flower's simulated clients."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if ray_address:
        if engine != "flower":
            raise ConfigError(f"--ray-address {ray_address}: only Flower's engine runs on a Ray cluster; drop "
                              f"--engine {engine} or the address")
        check_ray_address(ray_address)  # before the dataset is split and embedded
    if engine != "inprocess" and cfg.attack != "none":
        raise ConfigError(f"attack = {cfg.attack}: simulated attacks run on the in-process engine only (--engine inprocess)")
    started = time.perf_counter()
    temp = None
    if not cfg.out:
        temp = tempfile.mkdtemp(prefix="avrec-run-")
        cfg = cfg.replace(out=temp)
    out = Path(cfg.out).resolve()
    if engine == "inprocess":  # the setting its server runs with (simulations/inprocess.py), recorded as such
        cfg = cfg.replace(messages_in_flight=0)
    if not cfg.resume:
        refuse_existing(out)  # before anything is written: another run's records are never overwritten
    out.mkdir(parents=True, exist_ok=True)
    dataset_dir = resolve_dataset(cfg)
    cfg = cfg.replace(
        dataset=str(dataset_dir),
        out=str(out),
        state_dir=str(Path(cfg.state_dir).resolve() if cfg.state_dir else out / "devices"),
    )
    dataset = load_dataset(dataset_dir)
    split = run_split(dataset, cfg)
    users = split.users[: cfg.max_users] if cfg.max_users else split.users
    if split.dropped_users:
        log(f"avrec: drop-short-users: {split.dropped_users} user(s) with fewer than 3 interactions left out")
    if len(users) < cfg.min_clients:  # the server would wait for clients that never come
        raise ConfigError(f"{dataset_dir}: {len(users)} client(s) (one per user with at least 3 interactions"
                          f"{', max-users = ' + str(cfg.max_users) if cfg.max_users else ''}), fewer than min-clients "
                          f"= {cfg.min_clients}; lower min-clients or use a dataset with more users")
    content = item_content(dataset, cfg.modality_list, cfg.cache_dir or None, EncoderSettings.from_config(cfg))
    for line in media_failure_lines(content.failures):
        log(f"avrec: media that could not be decoded: {line}")
    log(
        f"avrec: {dataset_dir.name}: {len(users)} clients (one per user), {dataset.n_items} items, "
        f"{sum(len(u.train) for u in users)} training interactions; item content "
        f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in content.features.items())} "
        f"({content.computed} embedded now, the rest from the cache, {content.seconds:.1f} s)"
    )
    with TreeMemory() as memory:
        fed_started = time.perf_counter()
        federated = federate(cfg, len(users), out, engine, dataset_dir, ray_address)
        fed_seconds = time.perf_counter() - fed_started
        systems = {"avrec (federated)": federated}
        if with_baselines:
            log("avrec: baselines (popularity; the same towers trained centrally without DP)")
            systems["popularity"] = baselines.popularity(users, dataset.n_items)
            # The towers as they are without DP (ID embeddings and recent items on where configured).
            systems["central, no DP"] = baselines.central(users, content, dataset.n_items,
                                                          cfg.replace(dp="none", secure_aggregation=False))
    weights = {"avrec (federated)": learned_modality_weights(out / "best_model.safetensors", list(content.features))}
    if with_baselines:
        weights["central, no DP"] = systems["central, no DP"].get("modality_weights", {})
    privacy: dict[str, Any] = {"dp": cfg.dp}
    if cfg.record_dp:
        privacy["record_level"] = record_epsilons(Path(cfg.state_dir), cfg.delta)
        privacy["record_level"]["unit"] = "one interaction of one user (add/remove)"
    if cfg.user_dp:
        ledger = PrivacyLedger(out / "server-ledger.jsonl", level="user")
        report = user_epsilon(ledger.entries, cfg.user_delta)  # the most-charged client
        privacy["user_level"] = {"epsilon": report.epsilon, "delta": cfg.user_delta, "rounds": len(ledger.entries),
                                 "unit": "all data of one user", "trust_model": cfg.trust_model,
                                 "neighbouring": ledger.entries[0].neighbouring if ledger.entries else None,
                                 "accountant": report.accountant}
    # A run stopped before its first round (a spent budget) has no model to serve
    served = served_lists(out, cfg, dataset, users) if (out / "global_model.safetensors").exists() else None
    summary = {
        "dataset": str(dataset_dir),
        "clients": len(users),
        "items": dataset.n_items,
        "dataset_report": dataset.report,
        "protocols": {p: list(METRICS[p]) for p in PROTOCOLS},
        "systems": {name: {p: s["test"].get(p, {}) for p in PROTOCOLS} for name, s in systems.items()},
        "selection": {name: {k: s.get(k) for k in ("best_round", "best_epoch") if k in s} for name, s in systems.items()},
        "federated": {k: federated[k] for k in ("best_round", "rounds_run", "seconds_per_round", "clients_declined_total",
                                                  "updates_rejected_total", "clients_failed_total", "stop_reason")},
        "privacy": privacy,
        "modality_weights": weights,
        "media_failures": content.failures,
        **({"served_lists": served} if served is not None else {}),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "federation_seconds": round(fed_seconds, 1),
        "peak_memory_bytes": memory.peak,
        "config": cfg.to_flat(),
        "versions": versions(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(format_table(summary))
    if temp:
        shutil.rmtree(temp, ignore_errors=True)
    else:
        log(f"avrec: run directory {out}")
    return summary


def progress_line():
    """A live line for a terminal: devices done of those asked this round, elapsed and estimated time left."""
    def show(done: int, asked: int, seconds: float) -> None:
        left = seconds / done * (asked - done) if done else float("nan")
        end = "\n" if done == asked else ""
        print(f"\r  devices {done}/{asked}  {seconds:6.1f} s elapsed  ~{left:5.1f} s left", end=end, flush=True)
    return show


def federate(cfg: RunConfig, clients: int, out: Path, engine: str, dataset_dir: Path,
             ray_address: str | None = None) -> dict[str, Any]:
    """Run the app on the engine and return federated.json; RunFailed (non-zero exit) when the server found
    that the run trained nothing usable, with its reasons counted."""
    if engine == "inprocess":  # the server's RunFailed propagates as it is
        run_inprocess(cfg, clients, str(dataset_dir), progress_line() if sys.stdout.isatty() else None)
    else:
        if sys.stdout.isatty() and not cfg.progress_seconds:  # a long round is not silent on a terminal
            cfg = cfg.replace(progress_seconds=10.0)
        try:
            run_app(cfg.to_flat(), clients, out / "engine", ray_address=ray_address)
        except EngineError:
            failed = (out / "federated.json").exists() and read_json(out / "federated.json").get("failure")
            if failed:
                raise RunFailed(f"{out}: {failed}") from None
            raise
    if not (out / "federated.json").exists():  # `flwr run --stream` exits 0 even when the ServerApp raised
        raise EngineError(f"the federated run ended without writing {out / 'federated.json'}: the ServerApp failed "
                          f"(its traceback is in the log above; SuperLink log: {out / 'engine' / 'superlink.log'})")
    federated = read_json(out / "federated.json")
    if federated.get("failure"):
        raise RunFailed(f"{out}: {federated['failure']}")
    return federated


def learned_modality_weights(model_file: Path, names: list[str]) -> dict[str, float]:
    """Softmax of the item tower's modality logits in a saved global model (the fusion weights of an item
    that has every modality; an item lacking some renormalises over the rest)."""
    import torch
    from safetensors.torch import load_file

    if not model_file.is_file():
        return {}
    logits = load_file(model_file)["items.modality_logits.weight"][0]
    return dict(zip(names, torch.softmax(logits, dim=0).tolist()))


def media_failure_lines(failures: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {n} item(s) continue without it, e.g. {failures['examples'][key][0]}"
        for key, n in sorted(failures.get("failed", {}).items())
    ]


TRUST = {
    "secure": "each device added its own discrete Gaussian share and only their modular sum was decoded, so the "
              "guarantee holds against the server too (unless it colludes with devices, which can remove their shares)",
    "central": "the server added the noise and saw the clipped updates (or their exact sum): the guarantee protects "
               "against everyone who sees the released models, not against the server",
}


def format_table(summary: dict[str, Any]) -> str:
    cols = [(p, m) for p in PROTOCOLS for m in METRICS[p]]
    head = f"{'system':<20}" + "".join(f"{p + ' ' + m:>20}" for p, m in cols)
    lines = ["", head, "-" * len(head)]
    for name, table in summary["systems"].items():
        cells = (table.get(p, {}).get(m) for p, m in cols)
        lines.append(f"{name:<20}" + "".join(f"{'-':>20}" if v is None else f"{v:>20.4f}" for v in cells))
    if "served_lists" in summary:
        lines += table_lines(summary["served_lists"])
    fed = summary["federated"]
    lines.append("")
    if fed["best_round"] is None:
        lines.append(f"federated: no round evaluated ({fed['rounds_run']} run)")
    else:
        lines.append(f"federated: test at best validation round {fed['best_round']} of {fed['rounds_run']}; "
                     f"{fed['seconds_per_round']:.1f} s per round over {summary['clients']} clients")
    if fed.get("stop_reason"):  # a designed end (a spent budget, the cap on rounds per client)
        lines.append(f"federated: stopped early, as designed: {fed['stop_reason']}")
    for system, weights in summary.get("modality_weights", {}).items():
        if weights:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in weights.items())
            lines.append(f"learned modality weights, {system}: {shown}")
    for line in media_failure_lines(summary.get("media_failures", {})):
        lines.append(f"media failures: {line}")
    priv = summary["privacy"]
    if "record_level" in priv and priv["record_level"].get("clients"):
        r = priv["record_level"]
        lines.append(
            f"record-level DP (per device, one interaction): epsilon median {r['median']:.3f}, p95 {r['p95']:.3f}, "
            f"max {r['max']:.3f} at delta {r['delta']:g} over {r['clients']} devices"
        )
    if "user_level" in priv:
        u = priv["user_level"]
        lines.append(f"user-level DP (all data of one user), trust model {u.get('trust_model', 'central')}: epsilon "
                     f"{u['epsilon']:.3f} at delta {u['delta']:g} over {u['rounds']} rounds; {TRUST[u.get('trust_model', 'central')]}")
    if priv["dp"] == "none":
        lines.append("no differential privacy in this run")
    lines.append(
        f"wall time {summary['wall_seconds']:.0f} s (federation {summary['federation_seconds']:.0f} s); "
        f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB (this process and all its children)"
    )
    return "\n".join(lines)
