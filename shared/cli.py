"""The `avrec` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.config import ConfigError, load_config


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set num-rounds=5")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser(
        "simulate",
        help="federated DP training on one machine through Flower's simulation engine",
        description="Without options: MovieLens-100K, every user a client, record-level DP.",
    )
    sim.add_argument("--config", type=Path, help="TOML file of settings (see configs/)")
    sim.add_argument("--dataset", help="'movielens-100k' or a directory in avrec's dataset format")
    sim.add_argument("--out", type=Path, help="run directory for summary.json, rounds.jsonl, model, ledgers")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    args = parser.parse_args(argv)
    try:
        overrides = _overrides(args.set)
        if args.dataset:
            overrides["dataset"] = args.dataset
        if args.out:
            overrides["out"] = str(args.out)
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command == "simulate":
        from simulations.simulate import simulate

        simulate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
