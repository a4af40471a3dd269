"""The signed ledger heads a device reports: the same flat fields on the plain and the SecAgg+ path, read back
by the server only when the device's own key signed them."""

import pytest

from client.state import DeviceState
from shared.privacy.device_heads import HeadError, head_fields, split_heads


def a_head(root, entries=2):
    state = DeviceState(root)
    for r in range(1, entries + 1):
        state.ledger.append(level="record", round=r, mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=0.25,
                            steps=4, clip_norm=1.0, sampling="poisson-csprng", amplification=True,
                            neighbouring="add or remove one interaction of this user")
    return state.ledger_head()


def test_heads_travel_as_scalars_among_other_fields_and_come_back_by_device_key(tmp_path):
    heads = [a_head(tmp_path / "a"), a_head(tmp_path / "b", entries=3)]
    fields = {**head_fields(heads), "declined": 0.0, "sampled-99/test/hr@10": 0.5}
    assert all(isinstance(v, (str, int, float)) for v in fields.values())  # what a FitRes's metrics may carry
    received, rest = split_heads(fields)
    assert rest == {"declined": 0.0, "sampled-99/test/hr@10": 0.5}
    assert received == {h["public_key"]: {k: h[k] for k in ("entries", "last_hash", "signature")} for h in heads}


@pytest.mark.parametrize("forge, message", [
    (lambda f: f.update({"ledger-head.0.entries": 1}), "is not signed by its key"),  # a shorter ledger claimed
    (lambda f: f.pop("ledger-head.0.signature"), "lacks signature"),
    (lambda f: f.update({"ledger-head.0.entries": "2"}), "expected a hex key and a count >= 1"),
    (lambda f: f.update({"ledger-head.0.colour": "red"}), "reported field 'ledger-head.0.colour'"),
])
def test_a_forged_or_malformed_head_is_refused_with_the_field_named(tmp_path, forge, message):
    fields = head_fields([a_head(tmp_path)])
    forge(fields)
    with pytest.raises(HeadError, match=message):
        split_heads(fields)
