"""A secured deployment of real processes on loopback: a flower-superlink with TLS and SuperNode
authentication, three flower-supernode processes, each reading only its own slice of MovieLens-100K, two
rounds with record-level DP through `flwr run`; a SuperNode with an unregistered key and one without the
CA certificate are refused; every process is stopped by process id and no port stays in use."""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from server.app import initial_model
from shared.config import ConfigError, RunConfig
from shared.data.resolve import resolve_dataset
from shared.deploy.commands import supernode_command
from shared.deploy.config import load_deploy_settings
from shared.deploy.credentials import make_certificates, make_node_key
from shared.deploy.local import LocalFederation
from shared.deploy.partition import partition
from shared.privacy.ledger import PrivacyLedger
from shared.processes import descendants, free_port, port_in_use

REPO = Path(__file__).resolve().parents[1]


def test_private_keys_are_owner_only_and_certificate_names_loopback(tmp_path):
    from cryptography import x509

    certs = make_certificates(tmp_path / "certs", names=["avrec.example"])
    key = make_node_key(tmp_path / "keys" / "device-0")
    for private in (certs.ca_key, certs.server_key, key.private):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"avrec.example", "localhost"}
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_node_key(tmp_path / "keys" / "device-0")


def test_settings_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"\[superlink\] port = 70000"):
        load_deploy_settings(table={"superlink": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"\[supernode\] colour: unknown setting"):
        load_deploy_settings(table={"supernode": {"colour": "red"}})
    with pytest.raises(ConfigError, match=r"\[run\] unknown setting 'num-round'"):
        load_deploy_settings(table={"run": {"num-round": 2}})
    settings = load_deploy_settings(table={"superlink": {"ca-cert": str(tmp_path / "missing.crt")}})
    with pytest.raises(ConfigError, match=r"\[supernode\] private-key is not set"):
        supernode_command(settings, data_dir=tmp_path)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data = partition(resolve_dataset(RunConfig()), root / "data", devices=3, users_per_device=2)
    certs = make_certificates(root / "certs")
    keys = [make_node_key(root / "keys" / f"device-{k}") for k in range(4)]  # the 4th is never registered
    settings = load_deploy_settings(table={
        "federation": {"name": "avrec-test", "flwr-home": str(root / "flwr-home")},
        "superlink": {"port": free_port(), "ca-cert": str(certs.ca_cert), "certificate": str(certs.server_cert),
                      "private-key": str(certs.server_key)},
        "run": {"dataset": str(data.catalogue), "out": str(root / "run"), "num-rounds": 2, "dp": "record",
                "modalities": "text", "min-clients": 3},
    })
    federation = LocalFederation(settings, root / "processes")
    outcome = {}
    try:
        federation.start_superlink()
        for key in keys[:3]:
            registered = federation.register(key.public)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for k in range(3):
            federation.start_supernode(f"supernode-{k}", data_dir=data.devices[k], private_key=keys[k].private)
        result = federation.run(REPO, timeout=300)
        outcome["run"] = result.returncode
        # Refused nodes: an unregistered key, and the right key without the CA certificate.
        unregistered = federation.start_supernode("unregistered", data_dir=data.devices[0], private_key=keys[3].private)
        command = supernode_command(settings, data_dir=data.devices[1], private_key=keys[1].private, runtime_port=free_port())
        at = command.index("--root-certificates")
        no_ca = federation.start_supernode("no-ca", command=command[:at] + command[at + 2:])
        for name, process in (("unregistered", unregistered), ("no-ca", no_ca)):
            try:
                outcome[name] = process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                outcome[name] = None
    finally:
        federation.stop()
    outcome["leftover"] = descendants(os.getpid())
    outcome["ports"] = [p for p in federation.ports if port_in_use(p)]
    return root, data, settings, federation, outcome


def test_two_rounds_over_tls_with_authenticated_nodes(deployment):
    root, data, settings, federation, outcome = deployment
    assert outcome["run"] == 0, federation.log("flwr-run").read_text()[-3000:]
    rounds = [json.loads(line) for line in (root / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_aggregated"] == 3 and r["clients_failed"] == 0 for r in rounds), rounds
    # Under record-level DP a deployed device sends no evaluation and no loss: they depend on its records.
    assert all(r["metrics"] == {} and r["train_loss"] is None for r in rounds), rounds
    trained = load_file(root / "run" / "global_model.safetensors")
    initial = initial_model(settings.run, str(data.catalogue))
    assert trained.keys() == initial.keys()
    assert max((trained[k] - initial[k]).abs().max().item() for k in initial) > 1e-4


def test_devices_keep_their_state_on_their_own_disk(deployment):
    _, data, _, _, _ = deployment
    for device, users in zip(data.devices, data.users):
        assert sorted(p.name for p in (device / "state").iterdir()) == sorted(users)
        for user in users:
            ledger = PrivacyLedger(device / "state" / user / "privacy-ledger.jsonl", level="record")
            assert [e.mechanism for e in ledger.entries].count("dp-sgd") == 2
            assert (device / "state" / user / "private.safetensors").exists()


def test_audit_verify_checks_the_ledgers_collected_from_the_devices(deployment, capsys):
    from shared.cli import main

    root, data, _, _, outcome = deployment
    assert outcome["run"] == 0
    # The devices' state directories, as an auditor collects them (a folder per device): every ledger matches
    # the head its device reported, which the server signed into the manifest.
    assert main(["audit", "verify", str(root / "run"), "--devices", str(root / "data")]) == 0
    assert "6 device ledgers (18 entries" in capsys.readouterr().out
    # Without them each head in the manifest is reported, and the command fails.
    assert main(["audit", "verify", str(root / "run")]) == 1
    assert capsys.readouterr().err.count("that is not in the run directory (deleted)") == 6


def test_unregistered_key_and_missing_ca_are_refused(deployment):
    _, _, _, federation, outcome = deployment
    assert outcome["unregistered"] not in (None, 0), federation.log("unregistered").read_text()[-2000:]
    assert "Failed to activate SuperNode" in federation.log("unregistered").read_text()
    assert outcome["no-ca"] not in (None, 0), federation.log("no-ca").read_text()[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in federation.log("no-ca").read_text()


def test_every_process_stopped_and_every_port_free(deployment):
    _, _, _, _, outcome = deployment
    assert outcome["leftover"] == []
    assert outcome["ports"] == []
