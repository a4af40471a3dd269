"""The privacy-utility frontier on MovieLens-100K: test sampled-99 HR@10 against epsilon, per privacy unit and
trust model, beside non-private avrec, popularity and DP popularity at the same epsilon.

For each setting and target epsilon the noise multiplier is chosen (bisection) so that the accountant the run
itself uses for its budget check (RDP: an upper bound on the reported value) reaches the target after the
configured rounds, and the run's budget is set to the target, so it can never spend more. The epsilon in the
table is then what the run's own ledger gives (its summary), not the target. Runs go through the in-process
engine (`--engine flower` for Flower's); every point is a full `avrec simulate` run directory under --out.

Writes frontier.json, frontier.md and frontier.png in --out. Run: `avrec frontier [--epsilons 1,4,8]
[--settings user/secure,...] [--set key=value]`, or `python -m simulations.frontier`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shared.config import RunConfig, load_config
from shared.data.dataset import load_dataset
from shared.data.resolve import resolve_dataset
from shared.data.split import leave_one_out
from shared.features import EncoderSettings, catalogue_shapes
from shared.privacy.accounting import SampledGaussian, epsilon
from shared.privacy.participation import DDGRound, history_epsilon
from server.app import initial_model
from shared.secure import dimension, round_plan
from simulations import baselines
from simulations.simulate import simulate

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# unit/trust model -> settings. Record level runs DP-SGD on every device (trust model local).
SETTINGS: dict[str, dict[str, Any]] = {
    "user/secure": {"dp": "user", "trust-model": "secure"},
    "user/central": {"dp": "user", "trust-model": "central"},
    "record/local": {"dp": "record"},
}
HR = ("sampled-99", "hr@10")


def _bisect(epsilon_of: Callable[[float], float], target: float, low: float = 0.05, high: float = 400.0) -> float:
    """The smallest noise multiplier (to 0.5%) whose epsilon is at most `target` (epsilon falls with noise)."""
    if epsilon_of(high) > target:
        raise ValueError(f"epsilon {target} is out of reach even with noise multiplier {high}")
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if epsilon_of(mid) > target else (low, mid)
    return high


def user_noise(cfg: RunConfig, target: float, clients: int, dimension: int) -> float:
    """user-noise-multiplier whose run's worst-case user-level epsilon after num-rounds is `target`
    (every client every round, as the embedded default: fraction-train 1)."""
    def epsilon_of(sigma: float) -> float:
        if cfg.secure_trust:
            c = cfg.replace(user_noise_multiplier=sigma)
            survivors = max(1, math.ceil(cfg.secure_min_fraction * clients))
            event = DDGRound(round_plan(c, clients, dimension), survivors, 1.0)
        else:
            event = SampledGaussian(sigma, 1.0, 1)
        return history_epsilon([event] * cfg.num_rounds, cfg.user_delta, fast=True).epsilon
    return _bisect(epsilon_of, target)


def record_noise(cfg: RunConfig, target: float) -> tuple[float, float]:
    """(noise-multiplier, history-noise-multiplier) keeping the configured ratio of the two, so that every
    device's record-level epsilon after num-rounds (history released once) is `target`."""
    ratio = cfg.history_noise_multiplier / cfg.noise_multiplier

    def epsilon_of(sigma: float) -> float:
        events = [SampledGaussian(ratio * sigma, 1.0, 1)]
        events += [SampledGaussian(sigma, cfg.record_sample_rate, cfg.record_steps)] * cfg.num_rounds
        return epsilon(events, cfg.delta, accountant="rdp-fast")
    sigma = _bisect(epsilon_of, target)
    return sigma, ratio * sigma


def dp_popularity(users, n_items: int, target: float, delta: float, unit: str, seed: int = 0) -> dict:
    """Popularity from noised counts: one Gaussian release at `target` epsilon. Record level: each interaction
    adds 1 to one count (sensitivity 1). User level: each user's count vector is scaled to L2 norm 1."""
    sigma = _bisect(lambda s: epsilon([SampledGaussian(s, 1.0, 1)], delta), target)
    counts = np.zeros(n_items)
    for u in users:
        weight = 1.0 if unit == "record" else 1.0 / math.sqrt(len(np.unique(u.train)))
        np.add.at(counts, np.unique(u.train) if unit == "user" else u.train, weight)
    counts += np.random.default_rng(seed).normal(0.0, sigma, n_items)
    metrics = baselines.evaluate_scores(np.tile(counts, (len(users), 1)), users)
    return {"noise_multiplier": sigma, "hr@10": metrics["sampled-99/test/hr@10"]}


def run_point(cfg: RunConfig, out: Path, engine: str) -> dict:
    started = time.perf_counter()
    summary = simulate(cfg.replace(out=str(out)), log=lambda *_: None, engine=engine, with_baselines=False)
    privacy = summary["privacy"]
    eps = privacy["user_level"]["epsilon"] if cfg.user_dp else privacy["record_level"]["max"] if cfg.record_dp else None
    return {"epsilon": eps, "delta": cfg.user_delta if cfg.user_dp else cfg.delta,
            "hr@10": summary["systems"]["avrec (federated)"][HR[0]][HR[1]],
            "ndcg@10": summary["systems"]["avrec (federated)"][HR[0]]["ndcg@10"],
            "rounds": summary["federated"]["rounds_run"], "stop_reason": summary["federated"]["stop_reason"],
            "seconds": round(time.perf_counter() - started, 1), "run": str(out)}


def frontier(base: RunConfig, out: Path, epsilons=EPSILONS, settings=tuple(SETTINGS), engine: str = "inprocess",
             log=print) -> dict:
    dataset_dir = resolve_dataset(base)
    base = base.replace(dataset=str(dataset_dir))
    dataset = load_dataset(dataset_dir)
    users = leave_one_out(dataset, base.seed, base.eval_negatives, drop_short_users=base.drop_short_users).users
    users = users[: base.max_users] if base.max_users else users
    n_items, dims = catalogue_shapes(dataset_dir, base.modality_list, EncoderSettings.from_config(base))
    report: dict[str, Any] = {"clients": len(users), "items": n_items, "rounds": base.num_rounds, "engine": engine,
                              "metric": "/".join(HR) + " (test)", "points": {}, "dp_popularity": {}}
    log("frontier: non-private avrec and popularity")
    none = run_point(base.replace(dp="none"), out / "none", engine)
    report["non_private"] = {k: none[k] for k in ("hr@10", "ndcg@10", "run")}
    report["popularity"] = baselines.popularity(users, n_items)["test"][HR[0]][HR[1]]
    for name in settings:
        unit = name.split("/")[0]
        for target in epsilons:
            cfg = load_config(None, {**base.to_flat(), **SETTINGS[name]})
            if unit == "user":
                sigma = user_noise(cfg, target, len(users), dimension(initial_model(cfg, str(dataset_dir))))
                cfg = cfg.replace(user_noise_multiplier=sigma, user_epsilon_budget=target)
                noise = {"user-noise-multiplier": sigma}
            else:
                sigma, history_sigma = record_noise(cfg, target)
                cfg = cfg.replace(noise_multiplier=sigma, history_noise_multiplier=history_sigma, epsilon_budget=target)
                noise = {"noise-multiplier": sigma, "history-noise-multiplier": history_sigma}
            log(f"frontier: {name} at epsilon {target} ({', '.join(f'{k} {v:.3f}' for k, v in noise.items())})")
            point = {"target": target, **noise, **run_point(cfg, out / f"{name.replace('/', '-')}-eps{target:g}", engine)}
            report["points"].setdefault(name, []).append(point)
            log(f"  HR@10 {point['hr@10']:.4f} at epsilon {point['epsilon']:.3f} ({point['seconds']:.0f} s)")
            _save(report, out)
    for unit in sorted({n.split("/")[0] for n in settings}):
        delta = base.user_delta if unit == "user" else base.delta
        report["dp_popularity"][unit] = [{"epsilon": e, **dp_popularity(users, n_items, e, delta, unit)} for e in epsilons]
    _save(report, out)
    return report


def _save(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(report, indent=2))
    (out / "frontier.md").write_text(markdown(report))
    plot(report, out / "frontier.png")


def markdown(report: dict) -> str:
    lines = [f"{report['metric']} on {report['clients']} clients, {report['rounds']} rounds "
             f"({report['engine']} engine). Epsilon: from each run's own ledger.", "",
             "| setting | target epsilon | epsilon (ledger) | HR@10 | NDCG@10 | noise multiplier | rounds |",
             "|---|---|---|---|---|---|---|"]
    for name, points in report["points"].items():
        for p in points:
            sigma = p.get("user-noise-multiplier", p.get("noise-multiplier"))
            lines.append(f"| {name} | {p['target']:g} | {p['epsilon']:.3f} | {p['hr@10']:.4f} | {p['ndcg@10']:.4f} | "
                         f"{sigma:.3f} | {p['rounds']} |")
    for unit, points in report.get("dp_popularity", {}).items():
        for p in points:
            lines.append(f"| DP popularity ({unit}) | {p['epsilon']:g} | {p['epsilon']:g} | {p['hr@10']:.4f} | | "
                         f"{p['noise_multiplier']:.3f} | 1 release |")
    if "non_private" in report:
        lines.append(f"| avrec, no DP | | | {report['non_private']['hr@10']:.4f} | {report['non_private']['ndcg@10']:.4f} | | |")
    if "popularity" in report:
        lines.append(f"| popularity | | | {report['popularity']:.4f} | | | |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in report["points"].items():
        ax.plot([p["epsilon"] for p in points], [p["hr@10"] for p in points], marker="o", label=f"avrec {name}")
    for unit, points in report.get("dp_popularity", {}).items():
        ax.plot([p["epsilon"] for p in points], [p["hr@10"] for p in points], ls=":", marker=".", label=f"DP popularity ({unit})")
    if "non_private" in report:
        ax.axhline(report["non_private"]["hr@10"], color="black", ls="--", label="avrec, no DP")
    if "popularity" in report:
        ax.axhline(report["popularity"], color="grey", ls="--", label="popularity")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (each run's ledger)")
    ax.set_ylabel("test sampled-99 HR@10")
    ax.set_title(f"MovieLens-100K, {report['clients']} clients, {report['rounds']} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(commands) -> None:
    from shared.cli import add_config_arguments, config_from_args

    parser = commands.add_parser("frontier", help="privacy-utility frontier: HR@10 against epsilon per unit and trust model",
                                 description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS), help="comma-separated targets")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess")

    def run(args) -> int:
        cfg = config_from_args(args)
        settings = [s.strip() for s in args.settings.split(",") if s.strip()]
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown:
            raise SystemExit(f"avrec frontier: unknown setting(s) {', '.join(unknown)}; expected {', '.join(SETTINGS)}")
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
        out = Path(cfg.out) if cfg.out else Path("runs/frontier")
        report = frontier(cfg.replace(out=""), out, epsilons, settings, args.engine)
        print(markdown(report))
        print(f"avrec: frontier in {out}/frontier.json, frontier.md, frontier.png")
        return 0
    parser.set_defaults(func=run)


if __name__ == "__main__":
    import sys

    from shared.cli import main

    sys.exit(main(["frontier", *sys.argv[1:]]))
