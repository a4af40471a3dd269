"""Deployment settings: one TOML file (see configs/deploy.toml) read into typed settings.

Relative paths are relative to the file's directory. Every problem names the file, the table and key,
the value and what was expected.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import ConfigError, RunConfig, from_flat
from shared.data.resolve import BUILTIN

TABLES = {
    "federation": {"name", "address", "flwr-home"},
    "superlink": {"host", "port", "names", "ca-cert", "certificate", "private-key", "database", "log-file"},
    "supernode": {"data-dir", "state-dir", "cache-dir", "private-key", "ca-cert", "runtime-port", "connect-timeout"},
    "run": None,  # RunConfig keys, checked by shared.config
}


@dataclass(frozen=True)
class SuperLinkSettings:
    host: str  # where the SuperLink listens
    port: int  # its one HTTPS port (Fleet, Control and Runtime APIs)
    names: tuple[str, ...]  # names and addresses in its certificate
    ca_cert: Path | None  # checked when a command needs it (see shared.deploy.commands)
    certificate: Path | None
    private_key: Path | None
    database: Path | None  # None = state in memory (registrations are lost on restart)
    log_file: Path | None


@dataclass(frozen=True)
class SuperNodeSettings:
    data_dir: Path | None
    state_dir: Path | None  # None = <data-dir>/state
    cache_dir: Path | None  # None = the default embedding cache (~/.cache/avrec)
    private_key: Path | None
    ca_cert: Path | None  # the CA that signed the SuperLink certificate (a copy on the device)
    runtime_port: int  # the SuperNode's local Runtime API port (one per SuperNode on a machine)
    connect_timeout: float = 120.0  # seconds a SuperNode keeps trying to reach its SuperLink before giving up


@dataclass(frozen=True)
class DeploySettings:
    source: Path | None
    name: str  # the federation's name for `flwr run . NAME`
    address: str  # host:port devices and the flwr CLI use to reach the SuperLink
    flwr_home: Path  # FLWR_HOME for the flwr CLI (holds config.toml with this federation)
    superlink: SuperLinkSettings
    supernode: SuperNodeSettings
    run: RunConfig
    run_overrides: dict[str, Any]  # the [run] table as written (what `flwr run` is given)


def _where(source: Path | None, table: str, key: str) -> str:
    return f"{source or '<settings>'}: [{table}] {key}"


def load_deploy_settings(path: str | Path | None = None, table: dict[str, Any] | None = None) -> DeploySettings:
    """Settings from a TOML file (or an already parsed `table`, paths relative to the cwd)."""
    source = Path(path).resolve() if path is not None else None
    if source is not None:
        try:
            table = tomllib.loads(source.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read deployment settings {source}: {exc}") from exc
    table = table or {}
    base = source.parent if source else Path.cwd()
    for name, value in table.items():
        if name not in TABLES:
            raise ConfigError(f"{source or '<settings>'}: unknown table [{name}]; expected {', '.join(TABLES)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source or '<settings>'}: {name} must be a table ([{name}])")
        allowed = TABLES[name]
        for key in value:
            if allowed is not None and key not in allowed:
                raise ConfigError(f"{_where(source, name, key)}: unknown setting; expected one of {', '.join(sorted(allowed))}")

    def get(tbl: str, key: str, kind: type, default: Any = ...) -> Any:
        value = table.get(tbl, {}).get(key, default)
        if value is ...:
            raise ConfigError(f"{_where(source, tbl, key)} is missing")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{_where(source, tbl, key)} = {value!r}: expected a {kind.__name__}")
        return value

    def path_of(tbl: str, key: str, default: Any = ...) -> Path | None:
        value = get(tbl, key, str, default)
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    port = get("superlink", "port", int, 9093)
    runtime_port = get("supernode", "runtime-port", int, 9094)
    for tbl, key, value in (("superlink", "port", port), ("supernode", "runtime-port", runtime_port)):
        if not 0 < value < 65536:
            raise ConfigError(f"{_where(source, tbl, key)} = {value}: expected a TCP port 1-65535")
    connect_timeout = get("supernode", "connect-timeout", float, 120.0)
    if not 0 < connect_timeout < float("inf"):
        raise ConfigError(f"{_where(source, 'supernode', 'connect-timeout')} = {connect_timeout}: expected a number of "
                          "seconds > 0 (a SuperNode that cannot reach its SuperLink gives up after it)")
    names = get("superlink", "names", list, ["localhost", "127.0.0.1"])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{_where(source, 'superlink', 'names')} = {names!r}: expected a list of host names or IP addresses")
    host = get("superlink", "host", str, "127.0.0.1")
    address = get("federation", "address", str, f"{host}:{port}")
    if ":" not in address:
        raise ConfigError(f"{_where(source, 'federation', 'address')} = {address!r}: expected host:port")
    superlink = SuperLinkSettings(
        host=host,
        port=port,
        names=tuple(names),
        ca_cert=path_of("superlink", "ca-cert", ""),
        certificate=path_of("superlink", "certificate", ""),
        private_key=path_of("superlink", "private-key", ""),
        database=path_of("superlink", "database", ""),
        log_file=path_of("superlink", "log-file", ""),
    )
    supernode = SuperNodeSettings(
        data_dir=path_of("supernode", "data-dir", ""),
        state_dir=path_of("supernode", "state-dir", ""),
        cache_dir=path_of("supernode", "cache-dir", ""),
        private_key=path_of("supernode", "private-key", ""),
        ca_cert=path_of("supernode", "ca-cert", "") or superlink.ca_cert,
        runtime_port=runtime_port,
        connect_timeout=connect_timeout,
    )
    overrides = dict(table.get("run", {}))
    for key in ("dataset", "out", "state-dir", "cache-dir", "data-root"):
        # Paths the ServerApp reads are made absolute here, so `flwr run` works from any directory.
        value = overrides.get(key)
        if isinstance(value, str) and value and value != BUILTIN:
            p = Path(value).expanduser()
            overrides[key] = str(p if p.is_absolute() else (base / p).resolve())
    try:
        run = from_flat(overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source or '<settings>'}: [run] {exc}") from None
    return DeploySettings(
        source=source,
        name=get("federation", "name", str, "avrec"),
        address=address,
        flwr_home=path_of("federation", "flwr-home", "flwr-home"),
        superlink=superlink,
        supernode=supernode,
        run=run,
        run_overrides=overrides,
    )


def require_file(value: Path | None, where: str, hint: str) -> Path:
    """An existing file named by a setting; ConfigError naming the setting otherwise."""
    if value is None:
        raise ConfigError(f"{where} is not set; {hint}")
    if not value.is_file():
        raise ConfigError(f"{where} = {str(value)!r}: no such file; {hint}")
    return value
