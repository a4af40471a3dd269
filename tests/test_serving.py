"""Recommending on the device from a real run's outputs: a tiny `avrec simulate` on MovieLens-100K
(configs/smoke.toml, 3 users, 1 round) writes the global model and the devices' state that serving reads."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from client.serving import DeviceRecommender, ServingError
from shared.cli import main
from shared.config import load_config
from shared.model import build_model, recent_contexts
from shared.serving.tags import TagEdits, derive_interests
from simulations.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "run"
    cfg = load_config(ROOT / "configs" / "smoke.toml", {"max-users": 3, "num-rounds": 1, "out": str(out)})
    simulate(cfg, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def device(run):
    return DeviceRecommender.from_run(run)


def test_scores_are_the_models_scores_and_explanations_add_up(device, run):
    user = device.user("1")
    assert user.private is not None and len(user.history) == 272
    # The same towers the devices train, with the global weights and user 1's private vector.
    model = build_model(_content(device), device.dataset.n_items, device.cfg)
    model.load_state_dict({**load_file(run / "global_model.safetensors"),
                           "users.user_vector.weight": user.private[None]}, strict=False)
    history_sum = model.history_rows[torch.as_tensor(user.history)].sum(0, keepdim=True)
    recent = recent_contexts(user.history, device.cfg.recent_items)[-1:]
    expected = model.score_all(history_sum, recent=recent)[0]
    assert torch.allclose(device.recommender.scores(user.history, user.private), expected, atol=1e-4)

    recs, interests, _ = device.recommend("1", k=10)
    assert len(recs) == 10 and not {r.item for r in recs} & set(user.history.tolist())
    assert [r.rank_score for r in recs] == sorted((r.rank_score for r in recs), reverse=True)
    watched = {device.catalogue.titles[i] for i in user.history}
    for r in recs:
        assert r.score == pytest.approx(float(expected[r.item]), abs=1e-4)
        # Two exact decompositions of the same score: by history item (plus private vector and offset)
        # and by modality (plus ID embedding and offset).
        assert sum(r.user_parts.values()) == pytest.approx(r.score, abs=1e-3)
        assert sum(r.contributions.values()) == pytest.approx(r.score, abs=1e-3)
        assert set(r.contributions) == {"text", "id", "offset"} and sum(r.shares.values()) == pytest.approx(1.0)
        assert r.because and {t for t, _ in r.because} <= watched
        assert set(r.tags) <= set(interests.tags) and set(r.tags) <= set(device.catalogue.tags[r.item])


def _content(device):
    from shared.features import EncoderSettings, item_content

    return item_content(device.dataset, device.cfg.modality_list, device.cfg.cache_dir or None,
                        EncoderSettings.from_config(device.cfg))


def test_interest_tags_weigh_rare_tags_up():
    tags = [["drama"], ["drama"], ["drama", "film-noir"], ["drama", "film-noir"], ["comedy"], ["drama"], ["drama"]]
    # Two film-noir dramas and a comedy watched: film noir is rarer than drama in the catalogue, so it ranks
    # first (idf log(1 + 7/2) against log(1 + 7/6)); one comedy is not an interest (support 1).
    assert derive_interests([2, 3, 4], np.ones(3), tags) == {"film-noir": 1.0, "drama": pytest.approx(0.5141, abs=1e-4)}
    # Behaviour weights scale the evidence: the noir films rated low.
    low = derive_interests([0, 1, 2, 3], np.array([1.0, 1.0, 0.2, 0.2]), tags)
    assert list(low) == ["drama", "film-noir"]
    assert derive_interests([], np.ones(0), tags) == {}


def test_user_edits_tags_on_the_device_and_ranking_follows(run, device, capsys):
    state = run / "devices" / "2"
    assert main(["recommend", str(run), "--user", "2", "--add-tag", "Film-Noir", "--remove-tag", "drama",
                 "--tag-boost", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((state / "interests.json").read_text()) == {"added": ["film-noir"], "removed": ["drama"]}
    assert "film-noir" in out["interest_tags"] and "drama" not in out["interest_tags"]
    for r in out["recommendations"]:
        tags = device.catalogue.tags[r["item"]]
        assert "film-noir" in tags and "drama" not in tags, (r["title"], tags)
        assert "film-noir" in r["tags"]
    # Re-adding a removed tag un-removes it; the edits stay on the device across calls.
    TagEdits.load(state).edit(add=["drama"]).save(state)
    assert TagEdits.load(state) == TagEdits(["film-noir", "drama"], [])


def test_bad_input_names_the_value(run, tmp_path, capsys):
    assert main(["recommend", str(run), "--user", "no-such-user"]) == 2
    assert "user 'no-such-user' has no interactions" in capsys.readouterr().err
    assert main(["recommend", str(tmp_path), "--user", "1"]) == 2
    assert "global_model.safetensors not found" in capsys.readouterr().err
    (tmp_path / "interests.json").write_text("{\"added\": [")
    with pytest.raises(ValueError, match="interests.json: not a tag-edits file"):
        TagEdits.load(tmp_path)
    with pytest.raises(ServingError, match="model = 'last'"):
        DeviceRecommender.from_run(run, "last")


def test_simulate_judges_served_lists_and_compare_pairs_users(run, tmp_path, capsys):
    summary = json.loads((run / "summary.json").read_text())
    served = summary["served_lists"]
    assert set(served["systems"]) == {"avrec", "popularity"}
    for row in served["systems"].values():
        assert set(row) == {"hr@10", "ndcg@10", "ild@10", "novelty@10", "coverage@10"}
        assert 0 < row["ild@10"] <= 2 and 0 < row["coverage@10"] <= 1 and row["novelty@10"] > 0
    rows = [json.loads(line) for line in (run / "per-user.jsonl").read_text().splitlines()]
    assert sorted((r["user"], r["system"]) for r in rows) == sorted((u, s) for u in "123" for s in ("avrec", "popularity"))
    # A run against itself: every difference 0, no verdict. Against a copy where every user gains a hit: B higher.
    assert main(["compare", str(run), str(run)]) == 0
    assert capsys.readouterr().out.count("no clear difference") == 4
    # (the run's own hits depend on its DP noise: A is a copy where every user misses, so each pair differs by 1)
    worse, better = tmp_path / "a", tmp_path / "b"
    for folder, hit in ((worse, 0.0), (better, 1.0)):
        folder.mkdir()
        (folder / "per-user.jsonl").write_text("".join(json.dumps({**r, "hr@10": hit}) + "\n" for r in rows))
    assert main(["compare", str(worse), str(better), "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["hr@10"]["verdict"] == "B higher" and result["hr@10"]["users"] == 3
    assert result["ild@10"]["verdict"] == "no clear difference"
    assert main(["compare", str(run), str(tmp_path)]) == 2
    assert "per-user.jsonl not found" in capsys.readouterr().err


def test_new_users_are_served_from_tags_and_first_events(device):
    from simulations.new_users import evaluate

    # The run trained on users 1-3 only: users 4-8 are new to it (no private vector, none of their data).
    table = evaluate(device, clients=3, n_users=5, tag_boost=100.0)
    assert set(table) == {"avrec, 0 events, no tags", "avrec, 0 events, 3 picked tags"} | {
        f"{s}, first {k} events" for s in ("avrec", "popularity") for k in (0, 1, 3, 5)} - {"avrec, first 0 events"}
    for row in table.values():
        assert row["users"] == 5 and 0 <= row["precision@10"] <= 1 and 0 <= row["recall@20"] <= 1
