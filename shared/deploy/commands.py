"""The command lines of a secured deployment, built from the settings in one place.

`avrec deploy superlink|supernode|register|run` execute them; tests and scripts start them as child
processes. Nothing here weakens security: there is no `--insecure` anywhere, the SuperLink always serves
TLS and requires registered SuperNode keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from shared.config import ConfigError
from shared.deploy.config import DeploySettings, require_file
from shared.processes import flower_bin
from simulations.engine import toml_value

CERTS_HINT = "make them with `avrec deploy certs --out DIR --name HOST ...`"
KEY_HINT = "make one with `avrec deploy node-key PATH` and register PATH.pub with `avrec deploy register`"


def superlink_command(s: DeploySettings) -> list[str]:
    """flower-superlink with TLS on its one port and SuperNode authentication."""
    sl = s.superlink
    where = f"{s.source or '<settings>'}: [superlink]"
    command = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(require_file(sl.ca_cert, f"{where} ca-cert", CERTS_HINT)),
        "--ssl-certfile", str(require_file(sl.certificate, f"{where} certificate", CERTS_HINT)),
        "--ssl-keyfile", str(require_file(sl.private_key, f"{where} private-key", CERTS_HINT)),
        "--enable-supernode-auth",
        "--host", sl.host, "--port", str(sl.port),
        # Devices run the app in the environment they have; no `uv sync` of a fresh one per run.
        "--disable-runtime-dependency-installation",
    ]
    if sl.database:
        command += ["--database", str(sl.database)]  # registrations survive a restart
    if sl.log_file:
        command += ["--log-file", str(sl.log_file)]
    return command


def node_config(data_dir: Path, state_dir: Path | None = None, cache_dir: Path | None = None,
                extra: Mapping[str, object] | None = None) -> str:
    """The --node-config string the ClientApp reads (client/app.py device_for); `extra` adds keys (a test's
    `partition-id` for fault injection)."""
    pairs: dict[str, object] = {"data-dir": str(data_dir), **(extra or {})}
    if state_dir:
        pairs["state-dir"] = str(state_dir)
    if cache_dir:
        pairs["cache-dir"] = str(cache_dir)
    return " ".join(f"{k}={toml_value(v)}" for k, v in pairs.items())


def supernode_command(
    s: DeploySettings,
    data_dir: Path | None = None,
    private_key: Path | None = None,
    runtime_port: int | None = None,
    state_dir: Path | None = None,
    ca_cert: Path | None = None,
    extra_node_config: Mapping[str, object] | None = None,
) -> list[str]:
    """flower-supernode for one device: verifies the SuperLink against the CA, authenticates with the
    device's key, and gives the ClientApp its own data directory. Arguments override [supernode]."""
    sn = s.supernode
    where = f"{s.source or '<settings>'}: [supernode]"
    data_dir = data_dir or sn.data_dir
    if data_dir is None or not data_dir.is_dir():
        raise ConfigError(f"{where} data-dir = {str(data_dir) if data_dir else ''!r}: expected this device's data "
                          "directory (interactions.csv and items.csv; `avrec deploy partition` makes them)")
    key = require_file(private_key or sn.private_key, f"{where} private-key", KEY_HINT)
    ca = require_file(ca_cert or sn.ca_cert, f"{where} ca-cert", "copy the federation's ca.crt to the device")
    return [
        flower_bin("flower-supernode"),
        "--superlink", s.address,
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--port", str(runtime_port or sn.runtime_port),  # local Runtime API: one port per SuperNode
        "--max-wait-time", str(sn.connect_timeout),  # give up on an unreachable SuperLink instead of waiting forever
        "--node-config", node_config(data_dir, state_dir or sn.state_dir, sn.cache_dir, extra_node_config),
    ]


def federation_toml(s: DeploySettings) -> str:
    """$FLWR_HOME/config.toml for the flwr CLI: this federation, over TLS, verified against the CA."""
    where = f"{s.source or '<settings>'}: [superlink]"
    ca = require_file(s.superlink.ca_cert, f"{where} ca-cert", CERTS_HINT)
    return (
        f"[superlink]\ndefault = {toml_value(s.name)}\n\n"
        f"[superlink.{s.name}]\naddress = {toml_value(s.address)}\nroot-certificates = {toml_value(str(ca))}\n"
    )


def write_flwr_home(s: DeploySettings) -> Path:
    """Write the federation into the deployment's own FLWR_HOME (the user's ~/.flwr is left alone)."""
    s.flwr_home.mkdir(parents=True, exist_ok=True)
    (s.flwr_home / "config.toml").write_text(federation_toml(s))
    return s.flwr_home


def register_command(s: DeploySettings, public_key: Path) -> list[str]:
    if not public_key.is_file():
        raise ConfigError(f"public key {str(public_key)!r}: no such file; {KEY_HINT}")
    return [flower_bin("flwr"), "supernode", "register", str(public_key), s.name]


def write_run_config(s: DeploySettings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in s.run_overrides.items()))
    return path


def run_command(s: DeploySettings, app_dir: Path, run_config: Path) -> list[str]:
    return [flower_bin("flwr"), "run", str(app_dir), s.name, "--run-config", str(run_config), "--stream"]
