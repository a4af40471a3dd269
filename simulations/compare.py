"""`avrec compare RUN_A RUN_B`: an A/B comparison of two simulated runs, user by user.

Each run's harness saved per-user results of the lists its devices serve (`per-user.jsonl`, written by
`avrec simulate`; see `simulations.served_lists`). For every metric, the differences B - A are paired by
user (only users present in both runs), their mean is reported with a 95% percentile-bootstrap
confidence interval (users resampled with replacement, a fixed seed), and the verdict says which run is
higher where the interval excludes 0, else that the runs cannot be told apart on these users. Per-user
results are the simulation harness's: a deployed device never sends them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESAMPLES = 2000


def per_user(run_dir: Path, system: str) -> dict[str, dict[str, float]]:
    from simulations.served_lists import PER_USER  # here, so that `avrec` starts without torch

    path = run_dir / PER_USER
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a run directory written by `avrec simulate` "
                                "(runs made before per-user results were saved have none)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["user"]: {k: v for k, v in r.items() if k not in ("user", "system")} for r in rows if r["system"] == system}


def bootstrap_ci(diffs: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (RESAMPLES, len(diffs)))].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def compare(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float | str]]:
    users = sorted(set(a) & set(b))
    if len(users) < 2:
        raise ValueError(f"the runs share {len(users)} user(s); a paired comparison needs at least 2 "
                         "(were they run on the same dataset and users?)")
    out = {}
    for metric in a[users[0]]:
        if metric not in b[users[0]]:
            continue
        diffs = np.array([b[u][metric] - a[u][metric] for u in users])
        low, high = bootstrap_ci(diffs)
        verdict = "B higher" if low > 0 else "A higher" if high < 0 else "no clear difference"
        out[metric] = {"a": float(np.mean([a[u][metric] for u in users])), "b": float(np.mean([b[u][metric] for u in users])),
                       "mean_difference": float(diffs.mean()), "ci95_low": low, "ci95_high": high,
                       "users": len(users), "verdict": verdict}
    return out


def _compare(args: argparse.Namespace) -> int:
    try:
        result = compare(per_user(args.run_a, args.system), per_user(args.run_b, args.system))
    except (FileNotFoundError, ValueError) as exc:
        print(f"avrec compare: {exc}", file=sys.stderr)
        return 2
    print(f"A = {args.run_a}\nB = {args.run_b}\nsystem {args.system!r}, paired by user, 95% bootstrap CI of B - A "
          f"({RESAMPLES} resamples)")
    print(f"{'metric':<14}{'A':>10}{'B':>10}{'B - A':>10}{'95% CI':>22}  verdict")
    for metric, r in result.items():
        ci = f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}]"
        print(f"{metric:<14}{r['a']:>10.4f}{r['b']:>10.4f}{r['mean_difference']:>+10.4f}{ci:>22}  {r['verdict']}")
    users = next(iter(result.values()))["users"]
    print(f"{users} users in both runs")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def register(commands) -> None:
    p = commands.add_parser("compare", help="A/B: paired per-user differences of two runs with bootstrap CIs",
                            description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--system", default="avrec", help="which system's lists to compare (avrec or popularity)")
    p.add_argument("--json", type=Path, help="also write the comparison here")
    p.set_defaults(func=_compare)
