"""The `avrec` command.

Each subcommand lives in its own module, which exposes `register(commands)`: it adds its parser to the
subparsers and sets `func` (taking the parsed arguments, returning the exit status) as a default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from shared.config import ConfigError, from_flat, load_config
from shared.errors import UserError

# One line per subcommand module.
SUBCOMMANDS = [
    "shared.cli",  # simulate
    "shared.deploy.cli",  # deploy
    "shared.embed",  # embed
    "shared.privacy.cli",  # audit verify | report | empirical
    "simulations.frontier",  # frontier
    "shared.serving.cli",  # recommend
    "shared.text.cli",  # transcribe
    "simulations.compare",  # compare
]


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set num-rounds=5")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config/--dataset/--out/--set, shared by every subcommand that takes a run configuration."""
    parser.add_argument("--config", type=Path, help="TOML file of settings (see configs/)")
    parser.add_argument("--dataset", help="'movielens-100k' or a directory in avrec's dataset format")
    parser.add_argument("--out", type=Path, help="run directory for summary.json, rounds.jsonl, model, ledgers")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")


def config_from_args(args: argparse.Namespace):
    """The RunConfig named by add_config_arguments' options; ConfigError on a bad setting."""
    overrides = _overrides(args.set)
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.out:
        overrides["out"] = str(args.out)
    return load_config(args.config, overrides)


def resume_config(args: argparse.Namespace):
    """The configuration of the run in --resume RUN, with `resume` set and only num-rounds changeable."""
    from server.checkpoint import RESUMABLE_CHANGES, saved_config

    if args.config or args.dataset or args.out:
        raise ConfigError("--resume RUN continues that run with its own settings: drop --config, --dataset and "
                          "--out (only --set num-rounds=N may change)")
    overrides = _overrides(args.set)
    if set(overrides) - set(RESUMABLE_CHANGES):
        raise ConfigError(f"--resume: --set {', '.join(sorted(set(overrides) - set(RESUMABLE_CHANGES)))} would change "
                          "the run being resumed; only num-rounds may change")
    run = args.resume.resolve()
    return from_flat({**saved_config(run), **overrides, "resume": True, "out": str(run)})


def _simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import simulate

    simulate(resume_config(args) if args.resume else config_from_args(args), engine=args.engine,
             ray_address=args.ray_address)
    return 0


def register(commands) -> None:
    sim = commands.add_parser(
        "simulate",
        help="federated DP training on one machine through Flower's simulation engine",
        description="Without options: MovieLens-100K, every user a client, user-level DP under the secure trust model.",
    )
    add_config_arguments(sim)
    sim.add_argument("--engine", choices=("flower", "inprocess"), default="flower",
                     help="flower: Flower's simulation engine (default); inprocess: the same server loop and device "
                          "code in one process with devices trained as a batch (fast; no SecAgg+ protocol)")
    sim.add_argument("--ray-address", metavar="HOST:PORT",
                     help="run Flower's simulated clients on this existing Ray cluster (the head's GCS address, as "
                          "`ray start --head` prints it; avrec must run on a node of the cluster) instead of a Ray "
                          "started on this machine; RAY_ADDRESS in the environment is ignored")
    sim.add_argument("--resume", type=Path, metavar="RUN",
                     help="continue the run in directory RUN from its last checkpoint (with its own settings)")
    sim.set_defaults(func=_simulate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avrec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(commands)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        parser.error(str(exc))
    except UserError as exc:  # data, run-directory and run failures: one line, no traceback
        print(f"avrec: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
