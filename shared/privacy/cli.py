"""`avrec audit verify | report | empirical`: what a privacy auditor runs on a finished run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_run

    v = verify_run(args.run_dir, args.server_key, args.devices)
    for warning in v.warnings:
        print(f"warning: {warning}")
    if not v.ok:
        print(f"audit verify FAILED for {v.run_dir}: {len(v.problems)} problem(s)", file=sys.stderr)
        for problem in v.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    lines = [f"audit verify passed for {v.run_dir}",
             f"  server key {v.server_key[:16]}...; {len(v.server_entries)} user-level entries; "
             f"{len(v.devices)} device ledgers ({sum(map(len, v.devices.values()))} entries, read from "
             f"{v.devices_root}), every entry signed, every chain and head intact, the signed manifest matching"]
    if v.record_epsilons:
        from .verify import record_stats

        s = record_stats(list(v.record_epsilons.values()))
        lines.append(f"  record level, recomputed: epsilon median {s['median']:.4f}, p95 {s['p95']:.4f}, "
                     f"max {s['max']:.4f} at delta {v.config['delta']:g} (equal to summary.json)")
    if v.user is not None:
        how = (f"PLD; PRV {v.user.prv:.4f}, RDP {v.user.rdp:.4f}" if v.user.prv == v.user.prv  # NaN: no PRV ran
               else v.user.accountant)
        lines.append(f"  user level, recomputed: epsilon {v.user.epsilon:.4f} at delta {v.config['user-delta']:g} "
                     f"({how}) (equal to the stored values)")
    print("\n".join(lines))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    paths = write_report(args.run_dir, args.out, args.server_key, args.devices)
    for path in paths:
        print(f"wrote {path}")
    problems = json.loads(paths[1].read_text())["verification"]["problems"]
    if problems:  # the report is written either way; a run that fails verification never reports success
        print(f"avrec: error: {args.run_dir}: verification FAILED with {len(problems)} problem(s), e.g. {problems[0]}; "
              f"see {paths[0]}", file=sys.stderr)
        return 1
    return 0


def _empirical(args: argparse.Namespace) -> int:
    from .empirical import MARGIN, RUN_CANARY_CAP, audit_run, run_empirical

    if args.run_dir is None:  # the synthetic set-up (sigma 2, 200 examples), not a run's configuration
        result = run_empirical(level=args.level, canaries=args.canaries or 1000, noise_fraction=args.noise_fraction,
                               seed=args.seed or 0)
        audits = list(result.values())
    else:
        result = audit_run(args.run_dir, max_canaries=args.canaries or RUN_CANARY_CAP,
                           margin=MARGIN if args.margin is None else args.margin, size_runs=args.size_runs,
                           noise_fraction=args.noise_fraction, random_content=args.random_content, level=args.level,
                           seed=args.seed, leaky_divisor=args.leaky_divisor)
        audits = [a for level in ("record", "user") for a in _audits(result.get(level))]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    refuted = [a for a in audits if a.get("epsilon_lower_bound", 0) > a.get("claimed_epsilon", float("inf"))]
    if refuted:
        print(f"audit empirical: {len(refuted)} claim(s) refuted", file=sys.stderr)
    return 1 if refuted else 0


def _audits(level: dict | None) -> list[dict]:
    if not level:
        return []
    if "claimed_epsilon" in level:
        return [level]
    return [v for v in level.values() if isinstance(v, dict) and "claimed_epsilon" in v]


DEVICES_HELP = ("the ledgers collected from deployed devices: a folder per device holding its state directory "
                "(each user's privacy-ledger.jsonl, its head and signing-key.pub), checked against the heads in the "
                "signed manifest (default: RUN_DIR/devices, as a simulation writes them)")


def register(commands) -> None:
    audit = commands.add_parser("audit", help="verify, report on and empirically audit a run's privacy claims")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = sub.add_parser("verify", help="check every ledger chain, signature and head, and recompute every epsilon")
    verify.add_argument("run_dir", type=Path)
    verify.add_argument("--server-key", help="the server's Ed25519 public key (hex), from a channel you trust")
    verify.add_argument("--devices", type=Path, help=DEVICES_HELP)
    verify.set_defaults(func=_verify)
    report = sub.add_parser("report", help="write audit-report.md, audit-report.json and the epsilon-rounds figure")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, help="where to write (default RUN_DIR/audit)")
    report.add_argument("--server-key", help="the server's Ed25519 public key (hex), from a channel you trust")
    report.add_argument("--devices", type=Path, help=DEVICES_HELP)
    report.set_defaults(func=_report)
    emp = sub.add_parser(
        "empirical", help="empirical lower bounds on epsilon for a run's own mechanisms (one-run audit of Steinke, "
        "Nasr, Jagielski 2023; a multi-run size audit), each beside its claim and the largest epsilon it could certify")
    emp.add_argument("run_dir", type=Path, nargs="?",
                     help="audit this run's configuration (federated.json); without it, a small synthetic set-up")
    emp.add_argument("--level", choices=("record", "user", "both"), default="both")
    emp.add_argument("--canaries", type=int, help="with RUN_DIR: the most canaries per audit (default 10,000: 1.5 GB "
                     "peak at the ML-100K model); without: the canary count (default 1,000)")
    emp.add_argument("--margin", type=float, help="audit the longest prefix of the run whose claim plus this "
                     "(default 1) all-right guesses could certify")
    emp.add_argument("--size-runs", type=int, help="training runs per side of the size audit (default: as many as can "
                     "certify one round's claim plus 0.5, at most 3,000; 0 = skip)")
    emp.add_argument("--random-content", action="store_true",
                     help="random unit content rows of the run's shapes instead of loading its item content")
    emp.add_argument("--noise-fraction", type=float, default=1.0,
                     help="deliberately break the audited mechanisms: run them with this fraction of the claimed noise "
                     "(0 = none)")
    emp.add_argument("--leaky-divisor", action="store_true",
                     help="with RUN_DIR: deliberately break the size audit's DP-SGD with the n-leak (Opacus's divisor "
                     "int(n q), q = 1 / ceil(n / batch-size), which depends on the device's interaction count)")
    emp.add_argument("--seed", type=int,
                     help="seed of the canary directions and models (noise always comes from the OS)")
    emp.add_argument("--json", help="also write the results to this file (with RUN_DIR they are always written to "
                     "RUN_DIR/empirical-audit.json)")
    emp.set_defaults(func=_empirical)
