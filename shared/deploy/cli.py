"""`avrec deploy ...`: credentials, per-device data, and the secured Flower processes of a deployment.

certs, node-key and partition write files; superlink, register and run replace this process with the Flower
command built from the deployment settings (shared/deploy/commands.py), after printing it (no secret is ever
printed: key files are named by path only); supernode runs it as a child and explains how it ended.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

DEFAULT_SETTINGS = Path("configs/deploy/loopback.toml")


def _exec(command: list[str], flwr_home: Path | None = None) -> int:
    from shared.processes import flower_env

    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, flower_env(flwr_home))
    return 1  # not reached


def _settings(args: argparse.Namespace):
    from shared.deploy.config import load_deploy_settings

    return load_deploy_settings(args.settings)


def _certs(args: argparse.Namespace) -> int:
    from shared.deploy.credentials import make_certificates

    c = make_certificates(args.out, args.name or (), args.days, args.force)
    print(f"CA certificate (give to every device and flwr CLI): {c.ca_cert}")
    print(f"CA private key (keep offline, mode 0600): {c.ca_key}")
    print(f"SuperLink certificate for {', '.join(c.names)}: {c.server_cert}")
    print(f"SuperLink private key (mode 0600): {c.server_key}")
    return 0


def _node_key(args: argparse.Namespace) -> int:
    from shared.deploy.credentials import make_node_key

    k = make_node_key(args.path, args.comment, args.force)
    print(f"private key (stays on the device, mode 0600): {k.private}")
    print(f"public key (register it: avrec deploy register {k.public}): {k.public}")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from shared.config import RunConfig
    from shared.data.resolve import resolve_dataset
    from shared.deploy.partition import partition

    source = resolve_dataset(RunConfig(dataset=args.dataset))
    p = partition(source, args.out, args.devices, args.users_per_device, args.first_user)
    for path, users in zip(p.devices, p.users):
        print(f"{path}: users {', '.join(users)}")
    print(f"{p.catalogue}: the catalogue alone (the server's `dataset`)")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    from shared.deploy.commands import superlink_command

    s = _settings(args)
    return _exec(superlink_command(s), s.flwr_home)


def _register(args: argparse.Namespace) -> int:
    from shared.deploy.commands import register_command, write_flwr_home

    s = _settings(args)
    return _exec(register_command(s, args.public_key), write_flwr_home(s))


def _supernode(args: argparse.Namespace) -> int:
    from shared.deploy.commands import supernode_command
    from shared.processes import flower_env, reaped

    s = _settings(args)
    command = supernode_command(s, args.data_dir, args.key, args.runtime_port, args.state_dir, args.ca_cert)
    # A SuperNode keeps the apps it installs in FLWR_HOME: one per device.
    home = (args.data_dir or s.supernode.data_dir or Path(".")) / "flwr-home"
    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    # A child (not exec) so that its end can be explained; under the reaper, it dies with this process.
    code = subprocess.run(reaped(command), env=flower_env(home)).returncode
    if code:
        print(f"avrec: error: the SuperNode stopped with exit status {code}. If it could not reach its SuperLink at "
              f"{s.address}, it gave up after connect-timeout = {s.supernode.connect_timeout:g} s ([supernode] in "
              f"{s.source or 'the settings'}): check that the SuperLink runs and that this address and port are "
              "reachable from this device.", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    from shared.deploy.commands import run_command, write_flwr_home, write_run_config

    s = _settings(args)
    home = write_flwr_home(s)
    config = write_run_config(s, home / "run-config.toml")
    return _exec(run_command(s, args.app.resolve(), config), home)


def register(commands) -> None:
    deploy = commands.add_parser("deploy", help="secured deployment on Flower's deployment engine (README: Deploying to devices)")
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    p = sub.add_parser("certs", help="a CA and a SuperLink TLS certificate")
    p.add_argument("--out", type=Path, required=True, help="directory for ca.crt, ca.key, superlink.crt, superlink.key")
    p.add_argument("--name", action="append", help="DNS name or IP address of the SuperLink (repeatable; localhost and 127.0.0.1 are always added)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_certs)

    p = sub.add_parser("node-key", help="a device key pair for SuperNode authentication (EC P-384, OpenSSH)")
    p.add_argument("path", type=Path, help="private key path; the public key is PATH.pub")
    p.add_argument("--comment", default="")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_node_key)

    p = sub.add_parser("partition", help="slice a dataset into per-device directories (and a catalogue/ for the server)")
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--users-per-device", type=int, default=1)
    p.add_argument("--first-user", type=int, default=0)
    p.set_defaults(func=_partition)

    def with_settings(p: argparse.ArgumentParser) -> None:
        p.add_argument("--settings", type=Path, default=DEFAULT_SETTINGS, help=f"deployment settings (default {DEFAULT_SETTINGS})")

    p = sub.add_parser("superlink", help="start the SuperLink: TLS and SuperNode authentication")
    with_settings(p)
    p.set_defaults(func=_superlink)

    p = sub.add_parser("register", help="register a device's public key with the SuperLink")
    with_settings(p)
    p.add_argument("public_key", type=Path)
    p.set_defaults(func=_register)

    p = sub.add_parser("supernode", help="start this device's SuperNode on its own data directory")
    with_settings(p)
    p.add_argument("--data-dir", type=Path, help="overrides [supernode] data-dir")
    p.add_argument("--key", type=Path, help="overrides [supernode] private-key")
    p.add_argument("--state-dir", type=Path, help="overrides [supernode] state-dir")
    p.add_argument("--ca-cert", type=Path, help="overrides [supernode] ca-cert")
    p.add_argument("--runtime-port", type=int, help="overrides [supernode] runtime-port (one per SuperNode on a machine)")
    p.set_defaults(func=_supernode)

    p = sub.add_parser("run", help="run the app on the federation: flwr run APP NAME --run-config ([run] table)")
    with_settings(p)
    p.add_argument("--app", type=Path, default=Path("."), help="the app directory (this repository)")
    p.set_defaults(func=_run)
