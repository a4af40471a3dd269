"""`avrec audit verify` on a real (small) run directory with both DP levels, and on edited copies of it:
every kind of tampering must fail with a message naming the file, and the untouched run must pass.

Then on run directories built here and signed with their own keys, as the outside review built them: each
records a mechanism other than the one the configuration and the mechanism kind prescribe, a mechanism
missing, or a configuration edited after signing, and must fail with a message naming the problem; the same
directories built correctly must pass. Then `avrec audit report`'s threat model and the code digest. Last,
device ledgers collected from deployed devices (`--devices`): checked against the heads in the signed
manifest, so that one rolled back, truncated, forged or missing is refused, and so is a head the device never
signed."""

import json
import os
import shutil
import stat

import pytest
import torch

from shared.config import RunConfig, load_config
from shared.data.synthetic import write_planted_dataset
from shared.privacy.accounting import epsilon_checked
from shared.privacy.ledger import PrivacyLedger, canonical_json, entry_hash
from shared.privacy.manifest import REPO_ROOT, code_digest, config_digest, write_manifest
from shared.privacy.participation import participation, user_epsilon
from shared.privacy.report import collect, markdown
from shared.privacy.signing import load_or_create_key, public_hex, read_public
from shared.privacy.verify import record_stats, verify_run
from simulations.simulate import simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data = write_planted_dataset(root / "planted", n_users=6, n_items=90, n_clusters=3, interactions_per_user=20, seed=0)
    cfg = load_config(overrides={
        "dataset": str(data), "out": str(root / "run"), "cache-dir": str(root / "cache"), "num-rounds": 3,
        "eval-negatives": 49, "dp": "both", "trust-model": "central", "user-noise-multiplier": 2.0,
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


def test_the_real_run_binds_its_configuration_and_code(run):
    manifest = json.loads((run / "audit-manifest.json").read_text())
    federated = json.loads((run / "federated.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert manifest["config_sha256"] == config_digest(federated["config"]) == config_digest(summary["config"])
    # the server hashed the copy of the app Flower installed; this checkout is the code it came from
    assert manifest["code_sha256"] == code_digest()
    text = "\n".join(verify_run(run).problems)
    assert "config_sha256" not in text and "rounds.jsonl" not in text


# ---------------------------------------------------------------- signed run directories built here

RECORD_NEIGHBOURS = "add or remove one interaction of this user"
USER_NEIGHBOURS = "add or remove one user (all of a client's data)"
CSPRNG = "secrets.SystemRandom (OS CSPRNG)"


def dp_sgd(cfg, rnd, **changes):
    """A dp-sgd entry as the device records it: the fixed shape from the configuration, no example count."""
    return {"level": "record", "round": rnd, "mechanism": "dp-sgd", "noise_multiplier": cfg.noise_multiplier,
            "sample_rate": cfg.record_sample_rate, "steps": cfg.record_steps, "clip_norm": cfg.clip_norm,
            "sampling": "poisson-csprng", "amplification": True, "neighbouring": RECORD_NEIGHBOURS,
            "details": {"divisor": cfg.batch_size, "grad_sample_mode": cfg.grad_sample_mode, "sampling_source": CSPRNG,
                        "noise_source": "torch.Generator seeded with 62 bits from the OS CSPRNG"}, **changes}


def history_release(cfg, rnd, **changes):
    return {"level": "record", "round": rnd, "mechanism": "gaussian-history-release",
            "noise_multiplier": cfg.history_noise_multiplier, "sample_rate": 1.0, "steps": 1, "clip_norm": 1.0,
            "sampling": "none", "amplification": False, "neighbouring": RECORD_NEIGHBOURS,
            "details": {"sensitivity": "each history row has L2 norm <= 1"}, **changes}


def dp_fedavg(cfg, rnd, participants, population, **changes):
    amplified = cfg.fraction_train < 1.0
    return {"level": "user", "round": rnd, "mechanism": "dp-fedavg", "noise_multiplier": cfg.user_noise_multiplier,
            "sample_rate": cfg.fraction_train if amplified else 1.0, "steps": 1, "clip_norm": cfg.user_clip_norm,
            "sampling": "poisson-csprng" if amplified else "all-clients", "amplification": amplified,
            "neighbouring": USER_NEIGHBOURS,
            "details": {"population": population, "sampled": len(participants), "aggregated": len(participants),
                        "denominator": cfg.fraction_train * population if amplified else len(participants),
                        "fraction": cfg.fraction_train, "participants": participants,
                        "sampling_source": CSPRNG if amplified else "none"}, **changes}


def dp_fedavg_secagg(cfg, rnd, participants, population, **changes):
    """As the SecAgg+ server records it: an effective noise multiplier a little below the configured one."""
    return {"level": "user", "round": rnd, "mechanism": "dp-fedavg-secagg",
            "noise_multiplier": cfg.user_noise_multiplier * 0.999, "sample_rate": 1.0, "steps": 1,
            "clip_norm": cfg.user_clip_norm, "sampling": "all-clients", "amplification": False,
            "neighbouring": USER_NEIGHBOURS,
            "details": {"population": population, "aggregated": len(participants), "dropped": 0,
                        "denominator": float(population), "secure_aggregation": "secagg+",
                        "num_shares": cfg.secagg_num_shares, "quantization_bits": cfg.secagg_quantization_bits,
                        "configured_noise_multiplier": cfg.user_noise_multiplier}, **changes}


def ddg_round(cfg, rnd, participants, population, **changes):
    """As the server records a trust-model = secure round: the plan the configuration implies, all shares summed."""
    from server.secure_sum import SecureRound

    secure = SecureRound.plan_round(cfg, len(participants), {"w": torch.zeros(300)})
    entry = dp_fedavg(cfg, rnd, participants, population, mechanism="ddg-secure-sum")
    entry["details"] = {**entry["details"], **secure.ledger_details(len(participants))}
    return {**entry, **changes}


def plan(cfg, devices=3, rounds=3):
    """A correct run: which device trains in which round (every other one when sampling), its entries (a
    history release in its first round and on the refresh schedule, then DP-SGD), the server's entry per
    round, and rounds.jsonl's aggregated counts."""
    names = [f"user-{k}" for k in range(devices)]
    ledgers = {n: [] for n in names}
    server, rows, last = [], [], {}
    for rnd in range(1, rounds + 1):
        chosen = [k for k in range(devices) if cfg.fraction_train >= 1.0 or (k + rnd) % 2 == 0]
        for k in chosen if cfg.record_dp else []:
            n = names[k]
            if n not in last or (cfg.history_refresh_rounds and rnd - last[n] >= cfg.history_refresh_rounds):
                ledgers[n].append(history_release(cfg, rnd))
                last[n] = rnd
            ledgers[n].append(dp_sgd(cfg, rnd))
        if cfg.user_dp:
            make = dp_fedavg_secagg if cfg.secure_aggregation else ddg_round if cfg.trust_model == "secure" else dp_fedavg
            server.append(make(cfg, rnd, [k + 1 for k in chosen], devices))
        rows.append({"round": rnd, "clients_aggregated": len(chosen)})
    return {"server": server, "devices": ledgers, "rounds": rows}


def write_run(root, cfg, run_plan):
    """Write and sign a run directory as the server and the devices do: ledgers signed by each party's own
    key, epsilons computed from them, the manifest with the heads, participation and digests."""
    server_key = load_or_create_key(root / "server")
    heads = {}
    record = {}
    for name, entries in run_plan["devices"].items():
        if not entries:
            continue
        ledger = PrivacyLedger(root / "devices" / name / "privacy-ledger.jsonl", "record",
                               signer=load_or_create_key(root / "devices" / name))
        for entry in entries:
            ledger.append(**entry)
        head = ledger.head()
        heads[head["public_key"]] = {k: head[k] for k in ("entries", "last_hash", "signature")}
        record[name] = epsilon_checked(ledger.events(), cfg.delta).epsilon
    server = PrivacyLedger(root / "server-ledger.jsonl", "user", signer=server_key) if cfg.user_dp else None
    for entry in run_plan["server"]:
        server.append(**entry)
    entries = server.entries if server else []
    rows = [{**row, "user_epsilon": user_epsilon([e for e in entries if e.round <= row["round"]], cfg.user_delta).epsilon
             if entries else None} for row in run_plan["rounds"]]
    (root / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flat = cfg.to_flat()
    privacy = {"dp": cfg.dp}
    if record:
        privacy["record_level"] = {"clients": len(record), **record_stats(list(record.values()))}
    if server:
        privacy["user_level"] = {"epsilon": user_epsilon(entries, cfg.user_delta).epsilon}
    (root / "federated.json").write_text(json.dumps({"config": flat, "user_epsilon": rows[-1]["user_epsilon"]}))
    (root / "summary.json").write_text(json.dumps({"config": flat, "privacy": privacy}))
    write_manifest(root, server_key, {
        "server_ledger": {"entries": len(entries), "last_hash": entries[-1].hash if entries else ""} if server else None,
        "device_heads": heads, "participation": dict(participation(entries)), "config_sha256": config_digest(flat),
        "code_sha256": code_digest(), "rounds_run": len(rows),
    })
    return root


def build(tmp_path, edit=None, devices=3, rounds=3, **settings):
    """A signed run directory for the configuration `settings`; `edit(cfg, plan)` forges it before signing."""
    cfg = RunConfig().replace(out=str(tmp_path / "run"), **{"trust_model": "central", "user_noise_multiplier": 1.0, **settings})
    run_plan = plan(cfg, devices, rounds)
    if edit:
        edit(cfg, run_plan)
    return write_run(tmp_path / "run", cfg, run_plan)


def problems(run_dir):
    v = verify_run(run_dir)
    assert v.ok is False, "the forged run directory passed verification"
    return "\n".join(v.problems)


@pytest.mark.parametrize("settings", [
    {"dp": "both"},
    {"dp": "user", "fraction_train": 0.5},
    {"dp": "user", "secure_aggregation": True},
    {"dp": "record", "history_refresh_rounds": 2},
    {"dp": "user", "trust_model": "secure"},
], ids=["both", "user-sampled", "user-secagg", "record-refresh", "user-secure"])
def test_a_correctly_built_run_passes(tmp_path, settings):
    v = verify_run(build(tmp_path, rounds=5 if settings.get("history_refresh_rounds") else 3, **settings))
    assert v.ok, v.problems


def test_1_user_level_sample_rate_other_than_fraction_train_fails(tmp_path):
    def forge(cfg, p):
        p["server"][1].update(sample_rate=0.001)
    text = problems(build(tmp_path, forge, dp="user", fraction_train=0.5))
    assert ("server-ledger.jsonl: entry 2 (round 2, dp-fedavg): sample_rate is 0.001, expected 0.5 "
            "(fraction-train in the configuration, federated.json") in text


def test_1_amplification_claimed_with_every_client_taking_part_fails(tmp_path):
    def forge(cfg, p):
        p["server"][0].update(sample_rate=0.001, amplification=True, sampling="poisson-csprng",
                              details={**p["server"][0]["details"], "sampling_source": CSPRNG})
    text = problems(build(tmp_path, forge, dp="user"))
    assert "entry 1 (round 1, dp-fedavg): claims amplification at sample_rate 0.001, but fraction-train is 1.0" in text


def test_2_secagg_entry_with_other_noise_and_clip_fails(tmp_path):
    def forge(cfg, p):
        p["server"][0].update(noise_multiplier=0.3, clip_norm=5.0)
        del p["server"][0]["details"]["configured_noise_multiplier"]
        p["server"][1].update(noise_multiplier=0.3, details={**p["server"][1]["details"], "configured_noise_multiplier": 0.3})
    text = problems(build(tmp_path, forge, dp="user", secure_aggregation=True))
    assert ("entry 1 (round 1, dp-fedavg-secagg): noise_multiplier is 0.3, expected 1.0 (user-noise-multiplier in "
            "the configuration, federated.json)") in text
    assert "entry 1 (round 1, dp-fedavg-secagg): clip_norm is 5.0, expected 1.0 (user-clip-norm" in text
    assert "entry 2 (round 2, dp-fedavg-secagg): details.configured_noise_multiplier is 0.3, expected 1.0" in text


def test_2_secagg_entry_without_secure_aggregation_configured_or_recorded_fails(tmp_path):
    def forge(cfg, p):
        for e in p["server"]:
            e.update(mechanism="dp-fedavg-secagg", details={**e["details"], "secure_aggregation": ""})
    text = problems(build(tmp_path, forge, dp="user"))
    assert "records secure aggregation, but secure-aggregation is False" in text
    assert "details.secure_aggregation is '', expected the protocol that ran" in text


def test_2_unknown_mechanism_kinds_fail(tmp_path):
    def forge(cfg, p):
        p["server"][0]["mechanism"] = "dp-fedavg-v2"
        p["devices"]["user-0"][1]["mechanism"] = "dp-sgd-fast"
    text = problems(build(tmp_path, forge, dp="both"))
    assert "server-ledger.jsonl: entry 1 (round 1, dp-fedavg-v2): unknown mechanism kind 'dp-fedavg-v2'" in text
    assert "devices/user-0/privacy-ledger.jsonl: entry 2 (round 1, dp-sgd-fast): unknown mechanism kind" in text


def test_3_device_without_a_history_release_fails(tmp_path):
    def forge(cfg, p):
        p["devices"]["user-1"] = [e for e in p["devices"]["user-1"] if e["mechanism"] != "gaussian-history-release"]
    text = problems(build(tmp_path, forge, dp="record"))
    assert ("devices/user-1/privacy-ledger.jsonl: entry 1 (round 1, dp-sgd): no gaussian-history-release in this or "
            "any earlier round, expected one in the device's first round") in text


def test_3_history_release_off_its_schedule_or_noise_fails(tmp_path):
    def forge(cfg, p):
        ledger = p["devices"]["user-0"]  # releases in rounds 1 and 3; moved to 2, and round 5's dropped
        ledger[2:2] = [history_release(cfg, 2)]
        p["devices"]["user-0"] = [e for e in ledger if not (e["mechanism"] == "gaussian-history-release"
                                                             and e["round"] in (3, 5))]
        p["devices"]["user-1"][0].update(noise_multiplier=0.5)
    text = problems(build(tmp_path, forge, dp="record", history_refresh_rounds=2, rounds=5))
    assert ("user-0/privacy-ledger.jsonl: entry 3 (round 2, gaussian-history-release): a release 1 round(s) after "
            "the previous one (round 1), expected releases at least 2 rounds apart (history-refresh-rounds = 2") in text
    assert "(round 4, dp-sgd): no gaussian-history-release in this round, 2 rounds after the last (round 2)" in text
    assert ("user-1/privacy-ledger.jsonl: entry 1 (round 1, gaussian-history-release): noise_multiplier is 0.5, "
            "expected 4.0 (history-noise-multiplier in the configuration, federated.json)") in text


def test_4_data_dependent_dp_sgd_entry_fails(tmp_path):
    def forge(cfg, p):
        p["devices"]["user-2"][1].update(sample_rate=0.01, steps=1, details={
            "examples": 100, "batch_size": 16, "grad_sample_mode": "hooks", "sampling_source": CSPRNG})
    text = problems(build(tmp_path, forge, dp="record"))
    where = "devices/user-2/privacy-ledger.jsonl: entry 2 (round 1, dp-sgd): "
    assert where + "sample_rate is 0.01, expected 0.25 (record-sample-rate in the configuration, federated.json)" in text
    assert where + "steps is 1, expected 4 (record-steps in the configuration, federated.json)" in text
    assert where + "details.divisor is absent, expected 16 (batch-size in the configuration" in text
    assert (where + "details.examples is 100: records the device's interaction count, which the mechanism must not "
            "depend on or reveal") in text


def test_5_configuration_edited_after_signing_fails(tmp_path):
    run_dir = build(tmp_path, dp="both")
    federated = json.loads((run_dir / "federated.json").read_text())
    federated["config"]["user-delta"] = 1e-2
    (run_dir / "federated.json").write_text(json.dumps(federated))
    text = problems(run_dir)
    assert "federated.json: its configuration hashes to" in text and "(configuration edited after the run)" in text
    assert "summary.json: its configuration differs from federated.json's: user-delta is 0.0001, federated.json has 0.01" in text
    assert "summary.json: its configuration hashes" not in text


def test_5_both_configurations_edited_alike_fail_on_the_manifest(tmp_path):
    run_dir = build(tmp_path, dp="both")
    for name in ("federated.json", "summary.json"):
        doc = json.loads((run_dir / name).read_text())
        doc["config"]["user-delta"] = 1e-2
        (run_dir / name).write_text(json.dumps(doc))
    text = problems(run_dir)
    assert "federated.json: its configuration hashes to" in text and "summary.json: its configuration hashes to" in text


def test_1_amplification_from_a_sampler_other_than_the_os_csprng_fails(tmp_path):
    def forge(cfg, p):  # sampled, but from a seeded generator the server (or anyone with the seed) can replay
        p["server"][0]["details"]["sampling_source"] = "numpy.random.default_rng(seed)"
        p["devices"]["user-0"][1]["details"]["sampling_source"] = "torch.Generator seeded from the run seed"
    text = problems(build(tmp_path, forge, dp="both", fraction_train=0.5))
    only = "expected 'poisson-csprng' from the OS CSPRNG, the only sampling that earns it"
    assert ("server-ledger.jsonl: entry 1 (round 1, dp-fedavg): claims amplification by sampling, but its sampling is "
            f"'poisson-csprng' from 'numpy.random.default_rng(seed)'; {only}") in text
    assert ("devices/user-0/privacy-ledger.jsonl: entry 2 (round 2, dp-sgd): claims amplification by sampling, but its "
            f"sampling is 'poisson-csprng' from 'torch.Generator seeded from the run seed'; {only}") in text


def test_6_round_without_a_server_entry_fails(tmp_path):
    def forge(cfg, p):
        del p["server"][2]
    text = problems(build(tmp_path, forge, dp="user"))
    assert ("rounds.jsonl: round 3: 3 clients aggregated under user-level DP (dp = user in federated.json), but "
            "server-ledger.jsonl has no entry for round 3") in text


def test_6_missing_device_ledger_fails(tmp_path):
    run_dir = build(tmp_path, dp="record")
    (run_dir / "devices" / "user-1" / "privacy-ledger.jsonl").unlink()
    text = problems(run_dir)
    assert "the signed manifest names a device ledger (4 entries" in text and "(deleted)" in text
    assert ("rounds.jsonl: round 1: 3 clients aggregated under record-level DP (dp = record in federated.json), but "
            "only 2 device ledgers record a dp-sgd entry for round 1, expected at least 3") in text


# --------------------------------------------------------------------------------- audit report


def report_of(run_dir):
    facts = collect(run_dir)
    return facts, markdown(facts, "")


def test_a_run_without_secure_aggregation_is_never_described_as_having_it(tmp_path):
    facts, text = report_of(build(tmp_path / "a", dp="record"))  # secagg-* settings keep their defaults
    assert facts["verification"]["passed"] and facts["threat_model"]["secure_aggregation_ran"] is False
    assert "only the sum" not in text and "no secure aggregation ran in this run" in text

    def plain(cfg, p):  # secure-aggregation = true in the configuration, but plain DP-FedAvg rounds recorded
        p["server"] = [dp_fedavg(cfg, e["round"], [1, 2, 3], 3) for e in p["server"]]
    facts, text = report_of(build(tmp_path / "b", plain, dp="user", secure_aggregation=True))
    assert facts["threat_model"]["secure_aggregation_ran"] is False and "only the sum" not in text

    facts, text = report_of(build(tmp_path / "c", dp="user", secure_aggregation=True))
    assert facts["verification"]["passed"] and facts["threat_model"]["secure_aggregation_ran"] is True
    assert "The server sees only the sum of each round's clipped, quantised updates" in text


def test_user_level_without_secure_aggregation_says_the_server_sees_updates_in_clear(tmp_path):
    _, text = report_of(build(tmp_path, dp="user"))
    assert "The server sees every device's clipped shared-weight update in clear" in text
    assert ("User-level DP protects each user against everyone who sees the released global models, not against "
            "the server: the server sees every clipped update in clear") in text
    assert "the fixed DP-FedAvg denominator counts the participant set, which is treated as public" in text


def test_the_report_states_self_attestation(tmp_path):
    _, text = report_of(build(tmp_path, dp="both"))
    assert "a signature proves who wrote a record, not which noise ran" in text
    assert "the device code that ran" in text and "the OS CSPRNG" in text
    assert "can refute a claim but never prove one" in text


def test_the_code_digest_is_the_same_for_the_checkout_and_an_installed_copy(tmp_path):
    installed = tmp_path / "installed"
    for pkg in ("client", "server", "shared"):
        shutil.copytree(REPO_ROOT / pkg, installed / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # what an installed copy has that the checkout has not, or differently
    (installed / "pyproject.toml").write_text("[project]\nname = 'avrec'  # rewritten by flwr build\n")
    (installed / ".info").mkdir()
    (installed / ".info" / "CONTENT").write_text("shared/config.py,abc,123\n")
    (installed / "shared" / "notes.md").write_text("not code\n")
    (installed / "shared" / "__pycache__").mkdir(exist_ok=True)
    (installed / "shared" / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"\0compiled")
    (installed / "shared" / "__pycache__" / "stray.py").write_text("x = 1\n")
    assert code_digest(installed) == code_digest(REPO_ROOT)
    (installed / "shared" / "config.py").write_text((installed / "shared" / "config.py").read_text() + "\n# edited\n")
    assert code_digest(installed) != code_digest(REPO_ROOT)


def test_7_secure_round_with_a_plan_the_configuration_does_not_imply_fails(tmp_path):
    def forge(cfg, p):
        p["server"][0]["details"]["plan"]["local_stddev"] *= 0.1  # a tenth of the promised noise shares
        p["server"][1]["details"]["survivors"] = 1  # fewer shares than the round may decode
    text = problems(build(tmp_path, forge, dp="user", trust_model="secure"))
    assert "entry 1 (round 1, ddg-secure-sum): details.plan.local_stddev is" in text
    assert "entry 2 (round 2, ddg-secure-sum): details.survivors is 1, expected 3 .. 3" in text


def test_7_secure_round_under_a_central_configuration_fails(tmp_path):
    def forge(cfg, p):
        secure = cfg.replace(trust_model="secure")
        p["server"] = [ddg_round(secure, e["round"], e["details"]["participants"], 3) for e in p["server"]]
    text = problems(build(tmp_path, forge, dp="user"))
    assert "ddg-secure-sum entry, but trust-model is 'central'" in text


# ------------------------------------------------- ledgers collected from deployed devices (--devices)


def collected(tmp_path, keep_keys=False):
    """A signed run whose device ledgers are not in the run directory but collected from deployed devices:
    a folder per device holding its state directory (as `<data-dir>/state/<user>/` on the device), without
    the devices' private keys unless `keep_keys` (a device owner's own copy)."""
    run_dir = build(tmp_path, dp="record")
    devices = tmp_path / "collected"
    for k, user in enumerate(sorted(p.name for p in (run_dir / "devices").iterdir())):
        state = devices / f"device-{k}" / "state" / user
        shutil.copytree(run_dir / "devices" / user, state)
        if not keep_keys:
            (state / "signing-key.pem").unlink()
    shutil.rmtree(run_dir / "devices")
    return run_dir, devices


def resign(state, entries, key_dir=None):
    """Rewrite a ledger with `entries` and sign it as whoever holds the key in `key_dir` (default: the device's
    own, which the test keeps outside the collected copy)."""
    key = load_or_create_key(key_dir or state)
    for name in ("privacy-ledger.jsonl", "privacy-ledger.head.json"):
        (state / name).unlink()
    ledger = PrivacyLedger(state / "privacy-ledger.jsonl", "record", signer=key)
    for e in entries:
        ledger.append(**{k: v for k, v in e.items() if k not in ("hash", "prev_hash", "signature")})
    (state / "signing-key.pub").write_text(public_hex(key.public_key()) + "\n")


def entries_of(state):
    return [json.loads(line) for line in (state / "privacy-ledger.jsonl").read_text().splitlines()]


def device_state(devices, k):
    return next((devices / f"device-{k}" / "state").iterdir())


def test_ledgers_collected_from_deployed_devices_pass_and_are_needed(tmp_path):
    run_dir, devices = collected(tmp_path)
    v = verify_run(run_dir, devices=devices)
    assert v.ok, v.problems
    assert len(v.devices) == 3 and v.devices_root == devices.resolve()
    assert not any("collected device ledgers" in w for w in v.warnings)
    text = problems(run_dir)  # without them: each head in the manifest is reported, with where ledgers go
    assert text.count("that is not in the run directory (deleted)") == 3 and "passed with --devices DIR" in text


def test_a_device_ledger_not_collected_is_reported(tmp_path):
    run_dir, devices = collected(tmp_path)
    shutil.rmtree(devices / "device-1")
    v = verify_run(run_dir, devices=devices)
    assert not v.ok
    assert any("the signed manifest names a device ledger (4 entries, key" in p and "for which" in p and
               "holds no ledger (not collected from its device, or deleted): its mechanisms cannot be checked or "
               "accounted" in p for p in v.problems), v.problems
    assert "not a directory: --devices names the folder" in "\n".join(verify_run(run_dir, devices=tmp_path / "x").problems)


def test_a_collected_ledger_rolled_back_truncated_or_forged_is_refused(tmp_path):
    run_dir, devices = collected(tmp_path)
    original = {k: device_state(devices, k) for k in range(3)}
    # 0: rolled back one entry and re-signed with another key (the collected copy holds no private key)
    resign(original[0], entries_of(original[0])[:-1], tmp_path / "other-key")
    # 1: truncated without re-signing its head
    rewrite_lines(original[1] / "privacy-ledger.jsonl", lambda ls: ls[:-1])
    # 2: forged (noise raised, as if more noise had run) and re-signed with a fresh key
    forged = entries_of(original[2])
    forged[1]["noise_multiplier"] = 3.0
    resign(original[2], forged, tmp_path / "fresh-key")
    text = "\n".join(verify_run(run_dir, devices=devices).problems)
    where = {k: f"collected/device-{k}/state/{original[k].name}/privacy-ledger.jsonl" for k in range(3)}
    assert f"{where[0]}: its key is not among the device heads the server recorded in the signed manifest" in text
    assert f"{where[1]}: truncated or rolled back: its signed head records 4 entries" in text
    assert f"{where[2]}: its key is not among the device heads the server recorded in the signed manifest" in text
    # the devices' own keys (0 and 2) then have heads in the manifest and no ledger
    assert text.count("holds no ledger (not collected from its device, or deleted)") == 2


def test_a_collected_ledger_rolled_back_with_the_device_key_is_refused(tmp_path):
    # The device's owner holds its key: a consistent, re-signed, shorter ledger still differs from the head the
    # device reported to the server.
    run_dir, devices = collected(tmp_path, keep_keys=True)
    state = device_state(devices, 0)
    resign(state, entries_of(state)[:-1])
    text = "\n".join(verify_run(run_dir, devices=devices).problems)
    assert (f"collected/device-0/state/{state.name}/privacy-ledger.jsonl: the device last reported 4 entries ending in "
            in text and "the file holds 3 entries (rolled back or replaced after the run)" in text)


def test_a_head_the_device_never_reported_is_refused(tmp_path):
    # The server (its key signs the manifest) records a shorter head for a device than the device reported.
    run_dir, devices = collected(tmp_path)
    manifest = json.loads((run_dir / "audit-manifest.json").read_text())
    key, head = sorted(manifest["device_heads"].items())[0]
    state = next(p.parent for p in devices.rglob("signing-key.pub") if p.read_text().strip() == key)
    head.update(entries=3, last_hash=entries_of(state)[2]["hash"])
    body = {k: v for k, v in manifest.items() if k not in ("signature", "public_key")}
    write_manifest(run_dir, load_or_create_key(run_dir / "server"), body)
    text = "\n".join(verify_run(run_dir, devices=devices).problems)
    assert (f"audit-manifest.json: the head it records for device key {key[:16]}... (3 entries ending in "
            f"{head['last_hash'][:16]}...) is not signed by that key: a head the device never reported") in text


def test_a_ledger_grown_in_a_later_run_is_checked_up_to_the_recorded_head_and_copies_are_refused(tmp_path):
    run_dir = build(tmp_path, dp="record")
    cfg = RunConfig()
    user = a_device(run_dir)
    ledger = PrivacyLedger(user / "privacy-ledger.jsonl", "record", signer=load_or_create_key(user))
    ledger.append(**dp_sgd(cfg, 4, noise_multiplier=7.0))  # a later run, with another configuration
    devices = tmp_path / "collected"
    shutil.copytree(run_dir / "devices", devices / "device-0" / "state")
    v = verify_run(run_dir, devices=devices)
    assert v.ok, v.problems
    assert any("1 entries follow the head this run's manifest recorded (a later run's): checked and accounted up "
               "to entry 4" in w for w in v.warnings), v.warnings
    assert any("private signing keys lie inside the collected device ledgers" in w for w in v.warnings)
    shutil.copytree(user, devices / "device-9" / user.name)  # the same device's ledger twice
    assert "a second ledger of device key" in "\n".join(verify_run(run_dir, devices=devices).problems)
