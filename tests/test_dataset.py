"""Tests for the generic dataset format loader (shared.data.dataset)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from shared.data.dataset import DatasetError, load_dataset
from shared.data.movielens import default_data_root, import_ml100k

ITEMS = """item_id,title,genres,description,tags
i1,Toy Story (1995),Animation|Children's|Comedy,A cowboy doll is jealous,toys|pixar
i2,Heat (1995),Action|Crime,,
i3,"Quoted, Title",,Long film.,
"""

INTERACTIONS = """user_id,item_id,timestamp,rating
10,i1,300,5
2,i2,100,3
10,i2,100,4
2,i3,100,2
1,i3,50,1
10,i3,200,3
"""


def write(root: Path, interactions: str | None = INTERACTIONS, items: str | None = ITEMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if interactions is not None:
        (root / "interactions.csv").write_text(interactions)
    if items is not None:
        (root / "items.csv").write_text(items)
    return root


def error_of(root: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    return str(info.value)


# ---------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------


def test_round_trip_small_dataset(tmp_path: Path) -> None:
    ds = load_dataset(write(tmp_path / "d"))
    # numeric user ids sorted numerically, items in file order
    assert ds.user_ids == ["1", "2", "10"]
    assert ds.item_ids == ["i1", "i2", "i3"]
    assert ds.n_users == 3 and ds.n_items == 3
    assert list(ds.items["title"]) == ["Toy Story (1995)", "Heat (1995)", "Quoted, Title"]
    inter = ds.interactions
    assert list(inter.columns) == ["user", "item", "timestamp", "rating"]
    for col in ("user", "item", "timestamp", "rating"):
        assert inter[col].dtype == np.int64
    # sorted by (user, timestamp, file order): user "2" has a tie at t=100 -> file order i2, i3
    assert inter[["user", "item", "timestamp", "rating"]].values.tolist() == [
        [0, 2, 50, 1],
        [1, 1, 100, 3],
        [1, 2, 100, 2],
        [2, 1, 100, 4],
        [2, 2, 200, 3],
        [2, 0, 300, 5],
    ]
    assert ds.report["interactions_read"] == 6
    assert ds.report["duplicate_interactions_dropped"] == 0
    assert ds.root == (tmp_path / "d").absolute()


def test_string_user_ids_sorted_as_strings(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\nb,i1,1\n10,i1,1\na,i2,1\n9,i1,1\n"
    ds = load_dataset(write(tmp_path, inter))
    assert ds.user_ids == ["10", "9", "a", "b"]


def test_item_texts(tmp_path: Path) -> None:
    ds = load_dataset(write(tmp_path))
    assert ds.item_texts() == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy. A cowboy doll is jealous. Tags: toys, pixar.",
        "Heat (1995). Genres: Action, Crime.",
        "Quoted, Title. Long film.",
    ]


def test_title_only_items_and_extra_string_columns(tmp_path: Path) -> None:
    items = "item_id,title\n1,Alpha\n2,\n"
    inter = "user_id,item_id,timestamp,device\nu,1,5,phone\nu,2,6,\n"
    ds = load_dataset(write(tmp_path, inter, items))
    assert ds.item_texts() == ["Alpha.", ""]
    assert list(ds.interactions["device"]) == ["phone", ""]
    assert ds.media_paths("image") == [None, None]
    assert ds.feature_files() == {}


def test_duplicates_keep_earliest_and_are_counted(tmp_path: Path) -> None:
    inter = (
        "user_id,item_id,timestamp,rating\n"
        "1,i1,500,1\n"  # later duplicate of the line below (by time): dropped
        "1,i1,100,2\n"  # earliest: kept
        "1,i2,100,3\n"
        "1,i2,100,4\n"  # same time, later in file: dropped
        "2,i1,700,5\n"
    )
    ds = load_dataset(write(tmp_path, inter))
    assert ds.report["duplicate_interactions_dropped"] == 2
    assert ds.report["interactions_read"] == 5
    assert ds.interactions[["user", "item", "timestamp", "rating"]].values.tolist() == [
        [0, 0, 100, 2],
        [0, 1, 100, 3],
        [1, 0, 700, 5],
    ]


def test_iso_timestamps_parsed(tmp_path: Path) -> None:
    inter = (
        "user_id,item_id,timestamp\n"
        "1,i1,2020-01-01T00:00:00Z\n"
        "2,i1,2020-01-01T02:00:00+02:00\n"
        "3,i1,2020-01-01\n"
        "4,i1,2020-01-01 00:00:10\n"
        "5,i1,1577836800\n"
        "6,i1, 2021-06-30T12:34:56.900Z \n"
    )
    ds = load_dataset(write(tmp_path, inter))
    assert ds.interactions["timestamp"].tolist() == [
        1577836800, 1577836800, 1577836800, 1577836810, 1577836800, 1625056496,
    ]
    assert ds.interactions["timestamp"].dtype == np.int64


def test_blank_lines_do_not_shift_line_numbers(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\n1,i1,1\n\n1,i2,2\n,i3,3\n"
    msg = error_of(write(tmp_path, inter))
    assert "interactions.csv" in msg and "line 5" in msg and "empty user_id" in msg


def test_quoted_newline_line_numbers(tmp_path: Path) -> None:
    items = 'item_id,title\ni1,"two\nlines"\ni1,dup\n'
    msg = error_of(write(tmp_path, items=items))
    assert "items.csv" in msg and "line 4" in msg and "also on line 2" in msg


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path / "a", interactions=None))
    assert "interactions.csv" in msg and "not found" in msg
    msg = error_of(write(tmp_path / "b", items=None))
    assert "items.csv" in msg and "not found" in msg
    msg = error_of(tmp_path / "nowhere")
    assert "nowhere" in msg and "not found" in msg


def test_missing_required_columns_names_found_columns(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path / "a", "user,item_id,time\n1,i1,5\n"))
    assert "interactions.csv" in msg and "line 1" in msg
    assert "user_id" in msg and "timestamp" in msg
    assert "'user'" in msg and "'time'" in msg  # the columns that were found
    msg = error_of(write(tmp_path / "b", items="item_id;title\ni1;x\n"))
    assert "items.csv" in msg and "title" in msg and "'item_id;title'" in msg


def test_empty_file(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, items=""))
    assert "items.csv" in msg and "line 1" in msg and "empty" in msg


def test_empty_ids(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path / "a", "user_id,item_id,timestamp\n1,i1,1\n2,i1,1\n  ,i2,1\n"))
    assert "interactions.csv" in msg and "line 4" in msg and "empty user_id" in msg
    msg = error_of(write(tmp_path / "b", "user_id,item_id,timestamp\n1,i1,1\n2,,1\n"))
    assert "interactions.csv" in msg and "line 3" in msg and "empty item_id" in msg
    msg = error_of(write(tmp_path / "c", items="item_id,title\ni1,a\n,b\n"))
    assert "items.csv" in msg and "line 3" in msg and "empty item_id" in msg


def test_duplicate_item_id(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, items="item_id,title\ni1,a\ni2,b\ni1,c\n"))
    assert "items.csv" in msg and "line 4" in msg and "duplicate item_id 'i1'" in msg
    assert "line 2" in msg


def test_unknown_item_in_interactions(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\n1,i1,1\n1,i2,1\n2,i9,3\n3,i9,4\n"
    msg = error_of(write(tmp_path, inter))
    assert "interactions.csv" in msg and "line 4" in msg and "'i9'" in msg
    assert "items.csv" in msg and "2 interaction(s)" in msg


def test_unparsable_timestamp(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\n1,i1,100\n1,i2,2020-13-45\n1,i3,yesterday\n"
    msg = error_of(write(tmp_path / "a", inter))
    assert "interactions.csv" in msg and "line 3" in msg and "'2020-13-45'" in msg
    assert "2 bad value(s)" in msg
    msg = error_of(write(tmp_path / "b", "user_id,item_id,timestamp\n1,i1,\n"))
    assert "line 2" in msg and "unparsable timestamp ''" in msg
    msg = error_of(write(tmp_path / "c", "user_id,item_id,timestamp\n1,i1,99999999999999999999\n"))
    assert "line 2" in msg and "unparsable timestamp" in msg


def test_ragged_row(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "user_id,item_id,timestamp\n1,i1,1\n1,i2,1,extra\n"))
    assert "interactions.csv" in msg and "line 3" in msg and "4 fields" in msg


def test_not_utf8(tmp_path: Path) -> None:
    root = write(tmp_path)
    (root / "items.csv").write_bytes("item_id,title\ni1,ok\ni2,Caf\xe9\n".encode("latin-1"))
    msg = error_of(root)
    assert "items.csv" in msg and "line 3" in msg and "UTF-8" in msg


# ---------------------------------------------------------------------------
# Media
# ---------------------------------------------------------------------------


def test_media_paths_missing_and_symlinked_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside_posters"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(b"jpg")
    root = write(
        tmp_path / "d",
        items="item_id,title,image,audio\ni1,a,posters/a.jpg,snd/x.wav\ni2,b,posters/missing.jpg,\ni3,c,,\n",
    )
    os.symlink(outside, root / "posters")
    ds = load_dataset(root)
    assert ds.media_paths("image") == [root.absolute() / "posters" / "a.jpg", None, None]
    assert ds.media_paths("audio") == [None, None, None]
    assert ds.media_paths("video") == [None, None, None]
    assert ds.report["missing_image_files"] == 1
    assert ds.report["image_files"] == 1
    assert ds.report["missing_audio_files"] == 1
    assert all(p is None or p.is_absolute() for p in ds.media_paths("image"))
    with pytest.raises(ValueError):
        ds.media_paths("smell")


@pytest.mark.parametrize("bad", ["../secret.jpg", "posters/../../x.jpg", "/etc/passwd", "C:/x.jpg"])
def test_media_path_escaping_rejected(tmp_path: Path, bad: str) -> None:
    root = write(tmp_path, items=f"item_id,title,image\ni1,a,\ni2,b,{bad}\n")
    msg = error_of(root)
    assert "items.csv" in msg and "line 3" in msg and "image" in msg and "escapes" in msg


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


def test_features_load_and_validation(tmp_path: Path) -> None:
    root = write(tmp_path)
    (root / "features").mkdir()
    emb = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(root / "features" / "image-clip.npy", emb)
    np.save(root / "features" / "text-minilm-l6.npy", np.zeros((2, 4), dtype=np.float32))
    np.save(root / "features" / "audio-flat.npy", np.zeros(3, dtype=np.float32))
    np.save(root / "features" / "video-nan.npy", np.array([[0.0], [np.nan], [1.0]]))
    ds = load_dataset(root)
    assert set(ds.feature_files()) == {"image-clip", "text-minilm-l6", "audio-flat", "video-nan"}
    arr = ds.load_features("image-clip")
    assert arr.dtype == np.float32 and arr.shape == (3, 4)
    np.testing.assert_array_equal(arr, emb.astype(np.float32))
    with pytest.raises(DatasetError, match=r"text-minilm-l6\.npy.*2 rows; expected 3"):
        ds.load_features("text-minilm-l6")
    with pytest.raises(DatasetError, match=r"audio-flat\.npy.*expected a 2-D array"):
        ds.load_features("audio-flat")
    with pytest.raises(DatasetError, match=r"video-nan\.npy: row 1 \(item_id 'i2'\)"):
        ds.load_features("video-nan")
    with pytest.raises(DatasetError, match="image-clip"):
        ds.load_features("image-dino")


@pytest.mark.parametrize("name", ["images-clip.npy", "clip.npy", "image-clip.npz", "smell-x.npy"])
def test_bad_feature_file_names(tmp_path: Path, name: str) -> None:
    root = write(tmp_path)
    (root / "features").mkdir()
    np.save(root / "features" / "image-ok.npy", np.zeros((3, 2)))
    (root / "features" / name).write_bytes(b"x")
    msg = error_of(root)
    assert name in msg and "features" in msg and "<modality>-<name>.npy" in msg


# ---------------------------------------------------------------------------
# Scale and real data
# ---------------------------------------------------------------------------


def test_loading_100k_rows_is_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    root = tmp_path / "big"
    root.mkdir()
    (root / "items.csv").write_text("item_id,title\n" + "".join(f"{i},t{i}\n" for i in range(2000)))
    users = rng.integers(0, 1000, n)
    items = rng.integers(0, 2000, n)
    ts = rng.integers(0, 10**9, n)
    rows = "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in zip(users, items, ts, rng.integers(1, 6, n)))
    (root / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n" + rows)
    start = time.perf_counter()
    ds = load_dataset(root)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, elapsed
    n_pairs = len({(int(u), int(i)) for u, i in zip(users, items)})
    assert len(ds.interactions) == n_pairs
    assert ds.report["duplicate_interactions_dropped"] == n - n_pairs
    assert ds.n_users == len(set(users.tolist()))


_DATA_ROOT = default_data_root()
_HAVE_ML = _DATA_ROOT is not None and (_DATA_ROOT / "ml-100k" / "u.data").is_file()


@pytest.mark.skipif(not _HAVE_ML, reason="MovieLens-100K not available (set AVREC_DATA_DIR)")
def test_real_movielens_import_loads(tmp_path: Path) -> None:
    assert _DATA_ROOT is not None
    posters = _DATA_ROOT / "ml-100k-posters"
    out = import_ml100k(_DATA_ROOT / "ml-100k", tmp_path / "ml", posters if posters.is_dir() else None)
    ds = load_dataset(out)
    assert ds.n_users == 943
    assert ds.n_items == 1682
    assert len(ds.interactions) == 100_000
    assert ds.report["duplicate_interactions_dropped"] == 0
    assert ds.item_ids[0] == "1" and ds.items["title"].iloc[0] == "Toy Story (1995)"
    assert ds.item_texts()[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert ds.interactions["rating"].between(1, 5).all()
    if posters.is_dir():
        images = ds.media_paths("image")
        assert sum(p is not None for p in images) == 1620
        assert ds.report["missing_image_files"] == 0
        assert images[0] is not None and images[0].name == "1.jpg" and images[0].is_file()
