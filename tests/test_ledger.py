"""Tests for shared.privacy.ledger."""

import json
import math

import pytest

from shared.privacy.accounting import SampledGaussian as SG, epsilon, epsilon_checked
from shared.privacy.ledger import (
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    canonical_json,
    entry_hash,
)


def dp_sgd(round_, **over):
    fields = dict(
        round=round_,
        mechanism="dp-sgd",
        noise_multiplier=1.0,
        sample_rate=0.02,
        steps=50,
        clip_norm=1.0,
        sampling="poisson",
        amplification=True,
        neighbouring="add/remove one interaction",
        details={"examples": 500, "batch_size": 10},
    )
    fields.update(over)
    return fields


@pytest.fixture
def path(tmp_path):
    return tmp_path / "device" / "ledger.jsonl"


def filled(path, n=3):
    led = PrivacyLedger(path, "record")
    for r in range(n):
        led.append(**dp_sgd(r, noise_multiplier=1.0 + 0.1 * r))
    return led


def lines(path):
    return path.read_text().splitlines(keepends=True)


# ------------------------------------------------------------------ round trip


def test_append_reload_round_trip(path):
    led = filled(path)
    assert [e.round for e in led.entries] == [0, 1, 2]
    assert led.entries[0].prev_hash == ""
    assert all(b.prev_hash == a.hash for a, b in zip(led.entries, led.entries[1:]))
    again = PrivacyLedger(path, "record")
    assert again.entries == led.entries
    assert again.events() == led.events() == [SG(1.0 + 0.1 * r, 0.02, 50) for r in range(3)]
    assert again.rounds() == [0, 1, 2]
    # canonical JSON lines, hash over everything but the hash
    for raw, entry in zip(lines(path), again.entries):
        d = json.loads(raw)
        assert raw == canonical_json(d) + "\n"
        assert d["hash"] == entry.hash == entry_hash(d)
    # appending after reload continues the chain
    e = again.append(**dp_sgd(2, steps=7))
    assert e.prev_hash == led.entries[-1].hash
    assert PrivacyLedger(path, "record").rounds() == [0, 1, 2]
    assert len(PrivacyLedger(path, "record")) == 4


def test_new_ledger_is_empty_and_costs_nothing(path):
    led = PrivacyLedger(path, "user")
    assert led.entries == [] and led.rounds() == [] and led.events() == []
    assert not path.exists()
    assert led.epsilon(1e-5).epsilon == 0.0


def test_types_normalised_and_details_json(path):
    led = PrivacyLedger(path, "record")
    e = led.append(**dp_sgd(0, noise_multiplier=1, clip_norm=2, details={"ids": (1, 2), "n": 3}))
    assert isinstance(e.noise_multiplier, float) and isinstance(e.clip_norm, float)
    assert e.details == {"ids": [1, 2], "n": 3}
    assert PrivacyLedger(path, "record").entries == [e]


# ------------------------------------------------------------------- tampering


def test_edited_field_detected(path):
    filled(path)
    ls = lines(path)
    assert '"noise_multiplier":1.1' in ls[1]
    ls[1] = ls[1].replace('"noise_multiplier":1.1', '"noise_multiplier":9.1')
    path.write_text("".join(ls))
    with pytest.raises(LedgerError, match=r"line 2: hash mismatch"):
        PrivacyLedger(path, "record")


def test_deleted_middle_line_detected(path):
    filled(path)
    ls = lines(path)
    path.write_text(ls[0] + ls[2])
    with pytest.raises(LedgerError, match=r"ledger.jsonl, line 2: broken hash chain"):
        PrivacyLedger(path, "record")


def test_reordered_lines_detected(path):
    filled(path)
    ls = lines(path)
    path.write_text(ls[0] + ls[2] + ls[1])
    with pytest.raises(LedgerError, match="line 2: broken hash chain"):
        PrivacyLedger(path, "record")


@pytest.mark.parametrize("garbage", ["garbage\n", "{}\n", "\n", '{"round": 3', "[1,2]\n"])
def test_appended_garbage_detected(path, garbage):
    filled(path)
    with open(path, "a") as f:
        f.write(garbage)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="line 4"):
        PrivacyLedger(path, "record")
    assert path.read_bytes() == before  # never truncated or repaired


def test_appended_forged_entry_with_wrong_prev_hash_detected(path):
    led = filled(path)
    d = led.entries[-1].to_dict()
    d.update(round=9, prev_hash="0" * 64)
    d["hash"] = entry_hash(d)
    with open(path, "a") as f:
        f.write(canonical_json(d) + "\n")
    with pytest.raises(LedgerError, match="line 4: broken hash chain"):
        PrivacyLedger(path, "record")


def test_wrong_level_detected(path):
    filled(path)
    with pytest.raises(LedgerError, match="line 1: .*level 'record'.*level 'user'"):
        PrivacyLedger(path, "user")


def test_concurrent_writer_detected(path):
    a = filled(path, 1)
    b = PrivacyLedger(path, "record")
    b.append(**dp_sgd(1))
    with pytest.raises(LedgerError, match="changed since it was loaded"):
        a.append(**dp_sgd(1))
    assert len(PrivacyLedger(path, "record")) == 2


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "over, msg",
    [
        ({"hash": "x"}, "computed"),
        ({"prev_hash": ""}, "computed"),
        ({"signature": ""}, "computed"),
        ({"epsilon": 1.0}, "unknown"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"steps": 2.5}, "steps"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"level": "user"}, "level"),
        ({"amplification": True, "sampling": "uniform-without-replacement"}, "Poisson"),
        ({"amplification": True, "sampling": "poissonish"}, "Poisson"),
        ({"amplification": 1}, "amplification"),
        ({"details": {"x": object()}}, "JSON"),
        ({"details": {"x": math.inf}}, "JSON"),
        ({"details": {1: "a", "b": 2}}, "JSON"),
    ],
)
def test_invalid_appends_rejected(path, over, msg):
    led = PrivacyLedger(path, "record")
    with pytest.raises(LedgerError, match=msg):
        led.append(**dp_sgd(0, **over))
    assert led.entries == [] and not path.exists()


def test_poisson_variants_may_claim_amplification(path):
    led = PrivacyLedger(path, "user")
    e = led.append(**dp_sgd(1, sampling="poisson-csprng", neighbouring="add/remove one user"))
    assert e.event().sample_rate == 0.02


def test_missing_field_round_regression_and_mixed_units_rejected(path):
    led = filled(path, 2)
    fields = dp_sgd(3)
    del fields["clip_norm"]
    with pytest.raises(LedgerError, match="missing"):
        led.append(**fields)
    with pytest.raises(LedgerError, match="before the last recorded round"):
        led.append(**dp_sgd(0))
    with pytest.raises(LedgerError, match="never mix"):
        led.append(**dp_sgd(5, neighbouring="add/remove one user"))
    assert len(PrivacyLedger(path, "record")) == 2


# ------------------------------------------------------------------ accounting


def test_epsilon_from_entries(path):
    led = filled(path)
    r = led.epsilon(1e-5)
    assert r.epsilon == epsilon([SG(1.0 + 0.1 * k, 0.02, 50) for k in range(3)], 1e-5)
    assert r.rdp > r.pld > 0


def test_no_amplification_accounts_with_q_one(path, tmp_path):
    amp = PrivacyLedger(tmp_path / "amp.jsonl", "user")
    amp.append(**dp_sgd(0, mechanism="dp-fedavg", noise_multiplier=2.0, sample_rate=0.01, steps=5,
                        neighbouring="add/remove one user"))
    no_amp = PrivacyLedger(tmp_path / "noamp.jsonl", "user")
    no_amp.append(**dp_sgd(0, mechanism="dp-fedavg", noise_multiplier=2.0, sample_rate=0.01, steps=5,
                           sampling="uniform-without-replacement", amplification=False,
                           neighbouring="add/remove one user"))
    assert amp.events() == [SG(2.0, 0.01, 5)]
    assert no_amp.events() == [SG(2.0, 1.0, 5)]
    assert no_amp.entries[0].sample_rate == 0.01  # the recorded fact is kept
    e_amp, e_no = amp.epsilon(1e-5).epsilon, no_amp.epsilon(1e-5).epsilon
    assert e_no > 5 * e_amp
    assert e_no == pytest.approx(epsilon_checked([SG(2.0, 1.0, 5)], 1e-5).epsilon)


def test_check_budget(path):
    led = filled(path)
    now = led.epsilon(1e-5).epsilon
    small = SG(1.0, 0.02, 10)
    after = led.check_budget(small, 1e-5, budget=now + 0.5)
    assert now < after <= now + 0.5
    assert after == epsilon(led.events() + [small], 1e-5)
    big = SG(0.8, 0.02, 500)
    with pytest.raises(BudgetExceeded) as info:
        led.check_budget(big, 1e-5, budget=now + 0.5)
    exc = info.value
    assert exc.epsilon > now + 0.5 and exc.budget == now + 0.5 and exc.delta == 1e-5
    assert exc.unit == "record-level DP, neighbouring: add/remove one interaction"
    text = str(exc)
    assert f"{exc.epsilon:.4f}" in text and "delta=1e-05" in text and "add/remove one interaction" in text
    assert f"{now + 0.5:g}" in text
    assert len(PrivacyLedger(path, "record")) == 3  # a refused step records nothing
