"""`avrec audit verify` on a real (small) run directory with both DP levels, and on edited copies of it:
every kind of tampering must fail with a message naming the file, and the untouched run must pass."""

import json
import os
import shutil
import stat

import pytest

from shared.config import load_config
from shared.data.synthetic import write_planted_dataset
from shared.privacy.ledger import PrivacyLedger, canonical_json, entry_hash
from shared.privacy.signing import load_or_create_key, read_public
from shared.privacy.verify import verify_run
from simulations.simulate import simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data = write_planted_dataset(root / "planted", n_users=6, n_items=90, n_clusters=3, interactions_per_user=20, seed=0)
    cfg = load_config(overrides={
        "dataset": str(data), "out": str(root / "run"), "cache-dir": str(root / "cache"), "num-rounds": 3,
        "eval-negatives": 49, "dp": "both", "user-noise-multiplier": 2.0,
    })
    simulate(cfg, log=lambda *_: None)
    return root / "run"


@pytest.fixture
def copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def a_device(run_dir):
    return sorted((run_dir / "devices").iterdir())[0]


def rewrite_lines(path, edit):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


def failures(run_dir, **kw):
    v = verify_run(run_dir, **kw)
    assert not v.ok, "the edited run directory passed verification"
    return "\n".join(v.problems)


def test_the_untouched_run_passes_and_epsilons_are_recomputed(run):
    v = verify_run(run)
    assert v.ok, v.problems
    summary = json.loads((run / "summary.json").read_text())
    assert len(v.record_epsilons) == 6 and max(v.record_epsilons.values()) == summary["privacy"]["record_level"]["max"]
    assert v.user.epsilon == summary["privacy"]["user_level"]["epsilon"] > 0
    assert any("private signing keys" in w for w in v.warnings)


def test_keys_are_owner_only(run):
    for key in [run / "server" / "signing-key.pem", a_device(run) / "signing-key.pem"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_readable_key_is_refused(tmp_path):
    load_or_create_key(tmp_path)
    os.chmod(tmp_path / "signing-key.pem", 0o644)
    with pytest.raises(RuntimeError, match="permissions 0644"):
        load_or_create_key(tmp_path)


def test_edited_device_entry_fails(copy):
    path = a_device(copy) / "privacy-ledger.jsonl"
    rewrite_lines(path, lambda ls: [ls[0], ls[1].replace('"noise_multiplier":1.0', '"noise_multiplier":3.0'), *ls[2:]])
    assert "privacy-ledger.jsonl" in failures(copy) and "hash mismatch" in failures(copy)


def test_edited_and_rehashed_entry_fails_on_its_signature(copy):
    path = a_device(copy) / "privacy-ledger.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    entries[1]["noise_multiplier"] = 3.0
    prev = entries[0]["hash"]
    for e in entries[1:]:  # rebuild the whole chain, as someone without the key can
        e["prev_hash"] = prev
        e["hash"] = prev = entry_hash(e)
    path.write_text("".join(canonical_json(e) + "\n" for e in entries))
    assert "line 2: invalid signature" in failures(copy)


def test_reordered_server_entries_fail(copy):
    rewrite_lines(copy / "server-ledger.jsonl", lambda ls: [ls[1], ls[0], *ls[2:]])
    assert "server-ledger.jsonl" in failures(copy) and "broken hash chain" in failures(copy)


def test_truncated_server_ledger_fails(copy):
    rewrite_lines(copy / "server-ledger.jsonl", lambda ls: ls[:-1])
    assert "truncated or rolled back" in failures(copy)


def test_truncated_device_ledger_with_its_head_deleted_fails(copy):
    device = a_device(copy)
    rewrite_lines(device / "privacy-ledger.jsonl", lambda ls: ls[:-1])
    (device / "privacy-ledger.head.json").unlink()
    assert "head privacy-ledger.head.json is missing" in failures(copy)


def test_device_ledger_rolled_back_and_resigned_with_the_device_key_fails_on_the_manifest(copy):
    # Whoever holds the device's key can truncate and re-sign its ledger and head consistently; the server's
    # signed manifest still holds the last head the device reported.
    device = a_device(copy)
    rewrite_lines(device / "privacy-ledger.jsonl", lambda ls: ls[:-1])
    (device / "privacy-ledger.head.json").unlink()
    ledger = PrivacyLedger(device / "privacy-ledger.jsonl", "record")  # unchecked, then re-signed
    ledger.signer = load_or_create_key(device)
    ledger.public_key = read_public(device)
    ledger._write_head()
    assert "rolled back or replaced after the run" in failures(copy)


def test_a_deleted_device_fails(copy):
    shutil.rmtree(a_device(copy))
    assert "not in the run directory (deleted)" in failures(copy)


def test_edited_stored_epsilons_fail(copy):
    summary = json.loads((copy / "summary.json").read_text())
    summary["privacy"]["record_level"]["max"] *= 0.5
    summary["privacy"]["user_level"]["epsilon"] = 0.1
    (copy / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(line) for line in (copy / "rounds.jsonl").read_text().splitlines()]
    rows[0]["user_epsilon"] *= 0.5
    (copy / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = failures(copy)
    assert "record-level epsilon max" in text and "user-level epsilon is 0.1" in text
    assert "rounds.jsonl: round 1: user_epsilon" in text


def test_edited_manifest_and_a_wrong_pinned_key_fail(copy, run):
    manifest = json.loads((copy / "audit-manifest.json").read_text())
    manifest["rounds_run"] = 99
    (copy / "audit-manifest.json").write_text(json.dumps(manifest))
    assert "audit-manifest.json: invalid signature" in failures(copy)
    other = read_public(a_device(run))
    assert "not the pinned server key" in failures(run, server_key=other)
