"""Promotion attacks against avrec's defences: target exposure and accuracy with 0%, 1% and 5% malicious clients.

Every run is the ServerApp's own loop on the in-process engine (`simulations.inprocess`) with the attack's
malicious clients (`simulations.attacks`) beside the honest ones, so their updates go through the real
aggregation. After the last round the harness scores every honest user with the last global model and the
user's own private vector (the device's serving path: history with the validation item, consumed items
excluded): target exposure ER@5, the share of users whose top 5 holds the target among users who never had it,
and sampled-99 test HR@10. Per defence, each attacked run is paired with the same seed's run without attack:
HR@10 differences are paired by user (averaged over seeds) with a 95% bootstrap interval
(`simulations.compare.bootstrap_ci`).

`python -m simulations.attack_table [--users 200] [--rounds 5] [--seeds 0,1] [--defences none,norm-bound,
trimmed-mean] [--out runs/attacks]` writes attacks.json and attacks.md in --out (after every run, so a cut-short
benchmark keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from client.app import population
from client.history import release_history
from client.state import DeviceState
from shared.config import load_config
from shared.data.resolve import resolve_dataset
from shared.metrics import user_metrics
from shared.model import build_model, evaluation_inputs
from simulations.attacks import choose_target, popularity
from simulations.compare import bootstrap_ci
from simulations.inprocess import run_inprocess

SGD = {"server-optimizer": "sgd", "server-learning-rate": 10.0}  # plain server steps (the DP default's)
DEFENCES: dict[str, dict[str, Any]] = {
    "none": {},
    "norm-bound": {"robust-aggregation": "norm-bound"},
    "trimmed-mean": {"robust-aggregation": "trimmed-mean"},
    "median": {"robust-aggregation": "median"},
    # FedAdam's per-coordinate scaling turns a small bias that survives trimming into a full step: measured
    # beside plain server steps
    "sgd": SGD,
    "trimmed-mean-sgd": {"robust-aggregation": "trimmed-mean", **SGD},
    "user-dp": {"dp": "user", "trust-model": "central"},  # the device clips to user-clip-norm; server noise
}
ATTACKS = (("none", 0.0), ("fedrecattack", 0.01), ("fedrecattack", 0.05), ("fake-users", 0.05))
TOP = 5  # ER@5


@torch.no_grad()
def honest_outcomes(cfg, global_state: dict[str, torch.Tensor], target: int) -> dict[str, dict[str, float | None]]:
    """Per honest user: sampled-99 test HR@10 and whether the target is in its top 5 (None: the user had it)."""
    dataset, content, users = population(cfg)
    model = build_model(content, dataset.n_items, cfg, n_users=len(users))
    private = [DeviceState(Path(cfg.state_dir) / dataset.user_ids[u.user]).load_private() for u in users]
    rows = {n: torch.stack([p[n].reshape(-1) for p in private]) for n in model.state_dict() if n in private[0]}
    model.load_state_dict({**global_state, **rows}, strict=True)
    model.eval()
    out = {}
    for i, u in enumerate(users):
        history = release_history(content.history_rows, u.train, 0.0, torch.Generator())
        histories, recent = evaluation_inputs(history, model.history_rows, u.train, u.val, cfg.recent_items)
        val_scores, test_scores = model.score_all(histories, users=torch.tensor([i, i]), recent=recent).numpy()
        metrics = user_metrics(val_scores, u.train, u.val, u.test, u.val_negatives, u.test_negatives, test_scores)
        had = target in set(u.train.tolist()) | {u.val, u.test}
        served = test_scores.copy()
        served[np.append(u.train, u.val)] = -np.inf  # the device never serves what the user consumed
        top = np.argsort(-served, kind="stable")[:TOP]
        out[dataset.user_ids[u.user]] = {"hr@10": metrics["sampled-99/test/hr@10"],
                                         "exposed": None if had else float(target in top)}
    return out


def one_run(base, overrides: dict[str, Any], out: Path) -> tuple[dict[str, dict], float]:
    """A fresh run in `out` (removed first); its honest users' outcomes and its wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, {**base, **overrides, "out": str(out / "run"), "state-dir": str(out / "devices")})
    dataset_dir = resolve_dataset(cfg)
    cfg = cfg.replace(dataset=str(dataset_dir))
    started = time.perf_counter()
    _, _, users = population(cfg)
    run_inprocess(cfg, len(users), str(dataset_dir), threads=1)
    dataset, _, _ = population(cfg)
    target = choose_target(cfg, popularity(users, dataset.n_items))
    outcomes = honest_outcomes(cfg, load_file(out / "run" / "global_model.safetensors"), target)
    shutil.rmtree(out / "devices")  # device state is large and no longer needed
    return outcomes, time.perf_counter() - started


def summarise(results: dict[str, dict[str, dict]], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per (defence, attack, fraction): ER@5 and HR@10 means over seeds, HR@10 difference to the same
    defence without attack, paired by user (averaged over seeds), with its 95% bootstrap interval."""
    rows = []
    for name, by_seed in results.items():
        defence, attack, fraction = name.split("|")
        clean = {s: results.get(f"{defence}|none|0.0", {}).get(str(s)) for s in seeds}
        present = [s for s in seeds if str(s) in by_seed]
        if not present:
            continue
        exposure = [np.mean([o["exposed"] for o in by_seed[str(s)].values() if o["exposed"] is not None]) for s in present]
        hr = [np.mean([o["hr@10"] for o in by_seed[str(s)].values()]) for s in present]
        row = {"defence": defence, "attack": attack, "fraction": float(fraction), "seeds": present,
               "er@5": float(np.mean(exposure)), "hr@10": float(np.mean(hr))}
        paired = [s for s in present if clean[s]]
        if attack != "none" and paired:
            users = sorted(set.intersection(*(set(by_seed[str(s)]) for s in paired)))
            diffs = np.array([np.mean([by_seed[str(s)][u]["hr@10"] - clean[s][u]["hr@10"] for s in paired]) for u in users])
            low, high = bootstrap_ci(diffs)
            row.update(hr_difference=float(diffs.mean()), ci95=[low, high], paired_seeds=paired)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| defence | attack | malicious | seeds | ER@5 | sampled-99 HR@10 | HR@10 - same defence, no attack "
             "(95% CI) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{r['hr_difference']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if "hr_difference" in r else "-")
        seeds = ",".join(map(str, r["seeds"]))
        lines.append(f"| {r['defence']} | {r['attack']} | {r['fraction']:.0%} | {seeds} | {r['er@5']:.4f} | {r['hr@10']:.4f} "
                     f"| {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/no-dp.toml")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--defences", default="none,norm-bound,trimmed-mean,sgd,trimmed-mean-sgd",
                        help=f"any of {', '.join(DEFENCES)}")
    parser.add_argument("--attacks", default=",".join(f"{a}:{f}" for a, f in ATTACKS),
                        help="kind:fraction pairs; none:0 is the paired baseline")
    parser.add_argument("--norm-bound", type=float, default=5.0, help="robust-norm-bound, and fedrecattack's norm "
                        "where the server accepts any norm")
    parser.add_argument("--out", type=Path, default=Path("runs/attacks"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    attacks = [(a, float(f)) for a, f in (p.split(":") for p in args.attacks.split(","))]
    file_config = dict(load_config(args.config).to_flat())
    base = {**file_config, "max-users": args.users, "num-rounds": args.rounds, "modalities": "text",
            "robust-norm-bound": args.norm_bound}
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "attacks.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results: dict[str, dict[str, dict]] = saved.get("outcomes", {})
    header = (f"{args.users} users, {args.rounds} rounds, titles only, {args.config} (in-process engine), seeds "
              f"{args.seeds}; robust-norm-bound {args.norm_bound}; ER@5 and HR@10 on the last round's model")
    for seed in seeds:
        for defence in args.defences.split(","):
            for attack, fraction in attacks:
                name = f"{defence}|{attack}|{fraction}"
                if str(seed) in results.get(name, {}):
                    continue  # measured by an earlier, interrupted invocation
                overrides = {**DEFENCES[defence], "seed": seed, "attack": attack, "attack-fraction": fraction}
                if attack == "fedrecattack" and not load_config(None, {**base, **DEFENCES[defence]}).accepted_norm:
                    overrides["attack-norm"] = args.norm_bound  # the server accepts any norm: as long as the bound
                outcomes, seconds = one_run(base, overrides, args.out / "scratch")
                results.setdefault(name, {})[str(seed)] = outcomes
                exposed = [o["exposed"] for o in outcomes.values() if o["exposed"] is not None]
                print(f"seed {seed} {defence:<13} {attack:<13} {fraction:>5.0%}  ER@5 {np.mean(exposed):.4f}  "
                      f"HR@10 {np.mean([o['hr@10'] for o in outcomes.values()]):.4f}  ({seconds:.0f} s)", flush=True)
                rows = summarise(results, seeds)
                results_path.write_text(json.dumps({"header": header, "rows": rows, "outcomes": results}))
                (args.out / "attacks.md").write_text(markdown(rows, header))
    print(markdown(summarise(results, seeds), header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
