"""Bad input, bad settings and failed runs: each refused at once with one line naming the value, what was
expected and the likely cause (never a traceback, never exit 0), and settings that would void a guarantee
refused. Everything here fails before a federation starts, except the SuperNode that cannot reach its
SuperLink (a real flower-supernode, given up after a few seconds)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.records import failure
from shared.cli import main
from shared.config import ConfigError, load_config
from shared.data.dataset import MAX_CELL_CHARS, DatasetError, load_dataset
from shared.data.synthetic import write_planted_dataset
from shared.features import catalogue_shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_dataset(tmp_path_factory.mktemp("planted") / "d", n_users=4, n_items=24, n_clusters=2,
                                 interactions_per_user=6, seed=0)


def copy_of(planted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(planted, tmp_path / "data"))


def one_line_error(capsys, argv: list[str], status: int = 1) -> tuple[str, str]:
    """Run `avrec ARGV`; it must end with `status` and a one-line error, without a traceback. Returns the
    error line and what was printed to stdout."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's error exit (settings)
        code = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == status, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("avrec"), err
    return err.splitlines()[-1], captured.out


@pytest.mark.parametrize("setting", [
    "epsilon-budget=nan", "user-epsilon-budget=inf", "user-epsilon-budget=0", "epsilon-budget=-1",
    "noise-multiplier=nan", "user-noise-multiplier=-inf", "clip-norm=nan", "user-clip-norm=0",
    "delta=0", "user-delta=nan", "learning-rate=0", "server-learning-rate=nan", "logit-scale=-1",
    "history-noise-multiplier=nan", "private-learning-rate=-0.1", "eval-negatives=0", "min-clients=0",
])
def test_settings_that_void_a_guarantee_are_refused(setting):
    key, value = setting.split("=")
    with pytest.raises(ConfigError, match=key):
        load_config(overrides={"dp": "both", "trust-model": "central", key: value})


def test_history_noise_of_zero_is_refused_under_record_level_dp():
    with pytest.raises(ConfigError, match="history-noise-multiplier > 0"):
        load_config(overrides={"dp": "record", "history-noise-multiplier": "0"})


def test_unknown_and_misplaced_toml_keys_are_errors(tmp_path):
    cases = {
        "unknown.toml": ("num-round = 3\n", "unknown setting 'num-round'"),
        "stray.toml": ("num-rounds = 3\n[config]\ndp = 'none'\n", "'num-rounds' outside \\[config\\]"),
        "nested.toml": ("[model]\nembedding-dim = 32\n", "table\\(s\\) \\[model\\]"),
        "pyproject.toml": ("[tool.flwr.app.config]\nnum-rounds = 3\n", "table\\(s\\) \\[tool\\]"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message) as info:
            load_config(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    (tmp_path / "good.toml").write_text("[config]\nnum-rounds = 3\n")
    assert load_config(tmp_path / "good.toml").num_rounds == 3


def test_an_empty_dataset_is_refused_at_once(planted, tmp_path, capsys):
    data = copy_of(planted, tmp_path)
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    line, _ = one_line_error(capsys, ["simulate", "--dataset", str(data), "--out", str(tmp_path / "run")])
    assert "interactions.csv: no data lines after the header" in line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_an_oversized_cell_is_refused_with_its_line(planted, tmp_path):
    data = copy_of(planted, tmp_path)
    lines = (data / "items.csv").read_text().splitlines()
    lines[3] = lines[3].split(",", 1)[0] + "," + "x" * (MAX_CELL_CHARS + 1) + ",Sci-Fi,desc"
    (data / "items.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=f"line 4: column title holds {MAX_CELL_CHARS + 1:,} characters"):
        load_dataset(data)


def test_server_and_devices_count_the_same_items_despite_a_stray_blank_row(planted, tmp_path):
    data = copy_of(planted, tmp_path)
    with open(data / "items.csv", "a") as handle:
        handle.write(",,,\n")
    assert catalogue_shapes(data, ["text"])[0] == load_dataset(data).n_items == 24


def test_short_users_fix_is_reachable_from_the_cli_and_counted(planted, tmp_path, capsys):
    data = copy_of(planted, tmp_path)
    with open(data / "interactions.csv", "a") as handle:
        handle.write("short,1,1600000000\nshort,2,1600000060\n")
    line, _ = one_line_error(capsys, ["simulate", "--dataset", str(data), "--out", str(tmp_path / "a"), "--set",
                                   "eval-negatives=9"])
    assert "'short' (2)" in line and "--set drop-short-users=true" in line
    # With the setting the user is left out and counted; min-clients above the 4 remaining users then stops
    # the run before any federation starts (the server would otherwise wait for nodes that never come).
    line, out = one_line_error(capsys, ["simulate", "--dataset", str(data), "--out", str(tmp_path / "b"), "--set",
                                   "drop-short-users=true", "--set", "min-clients=5", "--set", "eval-negatives=9", "--set", "modalities=text",
                                   "--set", "cache-dir=" + str(tmp_path / "cache")], status=2)
    assert "4 client(s)" in line and "min-clients = 5" in line
    assert "1 user(s) with fewer than 3 interactions left out" in out


def test_resume_errors_are_one_line(tmp_path, capsys):
    line, _ = one_line_error(capsys, ["simulate", "--resume", str(tmp_path / "nothing")])
    assert "checkpoint.safetensors does not exist" in line
    line, _ = one_line_error(capsys, ["simulate", "--resume", str(tmp_path), "--set", "dp=none"], status=2)
    assert "--set dp would change the run being resumed" in line


def test_a_truncated_summary_is_a_clear_audit_problem(tmp_path, capsys):
    (tmp_path / "federated.json").write_text('{"config": {"dp": "user"}}')
    (tmp_path / "summary.json").write_text('{"systems": {"avrec')
    assert main(["audit", "verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "summary.json: not valid JSON" in err and "truncated" in err and "Traceback" not in err


def row(sampled: int, aggregated: int, failed: int = 0, rejected: int = 0, declined: int = 0, reasons=None) -> dict:
    return {"clients_sampled": sampled, "clients_aggregated": aggregated, "clients_failed": failed,
            "updates_rejected": rejected, "clients_declined": declined, "problem_counts": reasons or {}}


def test_a_run_that_aggregates_nothing_or_loses_most_clients_fails_with_reasons_counted():
    dead = [row(10, 0, failed=10, reasons={"node N: no reply": 10})] * 2
    assert failure(dead).startswith("no update was aggregated in any round: 20 of 20 client-rounds failed")
    assert "20 x node N: no reply" in failure(dead)
    most = [row(10, 4, failed=6, reasons={"node N: worker died": 6}), row(10, 3, rejected=7)]
    assert failure(most).startswith("most clients failed: 13 of 20")
    assert failure([row(10, 9, failed=1), row(10, 10)]) == ""
    # Devices declining at the end of their budget are a designed end, not a failure.
    assert failure([row(10, 10), row(10, 0, declined=10)]) == ""


def test_a_supernode_that_cannot_reach_its_superlink_gives_up_naming_it(tmp_path):
    from shared.deploy.credentials import make_certificates, make_node_key
    from shared.processes import flower_env, free_port

    certs, key = make_certificates(tmp_path / "certs"), make_node_key(tmp_path / "device-key")
    (tmp_path / "data").mkdir()
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "deploy.toml").write_text(
        f'[federation]\naddress = "{address}"\n[superlink]\nca-cert = "{certs.ca_cert}"\n'
        f'[supernode]\ndata-dir = "data"\nprivate-key = "{key.private}"\nruntime-port = {free_port()}\n'
        "connect-timeout = 2\n")
    done = subprocess.run([sys.executable, "-m", "shared.cli", "deploy", "supernode", "--settings",
                           str(tmp_path / "deploy.toml")], cwd=REPO, env=flower_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert f"could not reach its SuperLink at {address}" in done.stderr and "connect-timeout = 2 s" in done.stderr
    (tmp_path / "deploy.toml").write_text("[supernode]\nconnect-timeout = nan\n")
    from shared.deploy.config import load_deploy_settings

    with pytest.raises(ConfigError, match="connect-timeout = nan"):
        load_deploy_settings(tmp_path / "deploy.toml")


def test_more_bad_input_is_one_line(planted, tmp_path, capsys):
    line, _ = one_line_error(capsys, ["embed", str(tmp_path / "nowhere")])
    assert "not a directory" in line
    line, _ = one_line_error(capsys, ["simulate", "--dataset", str(planted), "--out", str(tmp_path / "run"), "--set",
                                      "modalities=smell", "--set", "eval-negatives=9"], status=2)
    assert "'smell' was requested" in line
    # A report over a directory that fails verification is written, but never ends as a success.
    line, _ = one_line_error(capsys, ["audit", "report", str(tmp_path)])
    assert "verification FAILED" in line


def test_a_spent_budget_is_a_designed_end_that_says_so(planted, tmp_path):
    """The user-level budget cannot pay for round 1: the run stops, exits normally and says why (on the
    in-process engine: the same server loop as on Flower's)."""
    from simulations.simulate import format_table, simulate

    cfg = load_config(overrides={"dataset": str(planted), "out": str(tmp_path / "run"), "cache-dir": str(tmp_path / "c"),
                                 "eval-negatives": 9, "modalities": "text", "user-epsilon-budget": 0.5})
    summary = simulate(cfg, log=lambda *_: None, engine="inprocess", with_baselines=False)
    assert summary["federated"]["rounds_run"] == 0
    assert summary["federated"]["stop_reason"] == "user-level budget 0.5 reached before round 1"
    assert "stopped early, as designed: user-level budget 0.5" in format_table(summary)
