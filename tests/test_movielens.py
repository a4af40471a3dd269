"""Tests for the MovieLens-100K locator/downloader and importer (shared.data.movielens)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.data.dataset import DatasetError, load_dataset
from shared.data.movielens import (
    ML100K_SHA256,
    default_data_root,
    import_ml100k,
    locate_or_download_ml100k,
    movielens_100k,
)

_DATA_ROOT = default_data_root()
_HAVE_ML = _DATA_ROOT is not None and (_DATA_ROOT / "ml-100k" / "u.data").is_file()
needs_ml = pytest.mark.skipif(not _HAVE_ML, reason="MovieLens-100K not available (set AVREC_DATA_DIR)")
# A URL nothing listens on: any attempt to download fails fast.
_NO_URL = "http://127.0.0.1:9/ml-100k.zip"


def ml_src() -> Path:
    assert _DATA_ROOT is not None
    return _DATA_ROOT / "ml-100k"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Serve a fresh folder over HTTP on 127.0.0.1 (port chosen by the OS)."""
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def build_zip(path: Path, tamper: bool = False, extra: dict[str, bytes] | None = None) -> Path:
    """Zip the real files under ml-100k/ (optionally with one byte of u.data changed)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name in ("u.data", "u.item", "u.user", "u.genre"):
            data = (ml_src() / name).read_bytes()
            if tamper and name == "u.data":
                pos = data.index(b"\t3\t")  # a rating "3" -> "4"
                data = data[: pos + 1] + b"4" + data[pos + 2 :]
            zf.writestr("ml-100k/" + name, data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------------------
# Local copy
# ---------------------------------------------------------------------------


@needs_ml
def test_local_copy_checksums_pass_without_download(tmp_path: Path) -> None:
    assert _DATA_ROOT is not None
    got = locate_or_download_ml100k(_DATA_ROOT, tmp_path / "cache", url=_NO_URL)
    assert got == _DATA_ROOT / "ml-100k"
    assert leftovers(tmp_path / "cache") == []
    for name, expected in ML100K_SHA256.items():
        assert hashlib.sha256((got / name).read_bytes()).hexdigest() == expected


@needs_ml
def test_modified_local_copy_is_rejected(tmp_path: Path) -> None:
    local = tmp_path / "root" / "ml-100k"
    local.mkdir(parents=True)
    for name in ("u.item", "u.user"):
        os.symlink(ml_src() / name, local / name)
    (local / "u.data").write_bytes((ml_src() / "u.data").read_bytes() + b"1\t1\t1\t1\n")
    with pytest.raises(DatasetError) as info:
        locate_or_download_ml100k(tmp_path / "root", tmp_path / "cache", url=_NO_URL)
    msg = str(info.value)
    assert "u.data" in msg and ML100K_SHA256["u.data"] in msg and "sha256 mismatch" in msg
    assert (local / "u.data").exists()  # the user's files are never deleted


def test_default_data_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVREC_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("AVREC_DATA_DIR")
    root = default_data_root()
    expected = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    assert root == (expected if expected.is_dir() else None)


# ---------------------------------------------------------------------------
# Download from a real local HTTP server
# ---------------------------------------------------------------------------


@needs_ml
def test_download_verify_and_import(tmp_path: Path, http_dir: tuple[Path, str]) -> None:
    served, base = http_dir
    build_zip(served / "ml-100k.zip")
    cache = tmp_path / "cache"
    empty_root = tmp_path / "empty_root"
    empty_root.mkdir()

    src = locate_or_download_ml100k(empty_root, cache, url=base + "/ml-100k.zip")
    assert src == cache / "ml-100k"
    assert sorted(p.name for p in src.iterdir()) == ["u.data", "u.genre", "u.item", "u.user"]
    assert leftovers(cache) == ["ml-100k"]  # no temp zip or temp folder left
    # a second call uses the cache, even with the server gone
    assert locate_or_download_ml100k(None, cache, url=_NO_URL) == src

    out = movielens_100k(data_root=empty_root, cache_dir=cache, url=_NO_URL)
    assert out == cache / "datasets" / "ml-100k"
    ds = load_dataset(out)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (943, 1682, 100_000)
    assert "image" not in ds.items.columns  # no posters under this data root
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["sha256"]["u.data"] == ML100K_SHA256["u.data"]


@needs_ml
def test_tampered_download_fails_and_leaves_nothing(tmp_path: Path, http_dir: tuple[Path, str]) -> None:
    served, base = http_dir
    build_zip(served / "ml-100k.zip", tamper=True)
    cache = tmp_path / "cache"
    empty_root = tmp_path / "empty_root"
    empty_root.mkdir()
    with pytest.raises(DatasetError) as info:
        movielens_100k(data_root=empty_root, cache_dir=cache, url=base + "/ml-100k.zip")
    msg = str(info.value)
    tampered = build_zip(tmp_path / "check.zip", tamper=True)
    with zipfile.ZipFile(tampered) as zf:
        actual = hashlib.sha256(zf.read("ml-100k/u.data")).hexdigest()
    assert "u.data" in msg
    assert ML100K_SHA256["u.data"] in msg and actual in msg
    assert "Likely cause" in msg
    assert leftovers(cache) == []
    assert not (cache / "ml-100k").exists() and not (cache / "datasets" / "ml-100k").exists()


@needs_ml
def test_zip_members_outside_the_folder_are_never_extracted(tmp_path: Path, http_dir: tuple[Path, str]) -> None:
    served, base = http_dir
    build_zip(served / "ml-100k.zip", extra={"../evil.txt": b"x", "/abs_evil.txt": b"x", "ml-100k/../../evil2": b"x"})
    cache = tmp_path / "cache"
    src = locate_or_download_ml100k(None, cache, url=base + "/ml-100k.zip")
    assert sorted(p.name for p in src.iterdir()) == ["u.data", "u.genre", "u.item", "u.user"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil2").exists()
    assert leftovers(cache) == ["ml-100k"]


def test_download_errors(tmp_path: Path, http_dir: tuple[Path, str]) -> None:
    served, base = http_dir
    (served / "not-a-zip.zip").write_text("<html>error page</html>")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="404"):
        locate_or_download_ml100k(None, cache, url=base + "/missing.zip")
    with pytest.raises(DatasetError, match="not a valid zip"):
        locate_or_download_ml100k(None, cache, url=base + "/not-a-zip.zip")
    with zipfile.ZipFile(served / "wrong.zip", "w") as zf:
        zf.writestr("other/u.data", b"1\t1\t1\t1\n")
    with pytest.raises(DatasetError, match="ml-100k/u.data not found"):
        locate_or_download_ml100k(None, cache, url=base + "/wrong.zip")
    assert leftovers(cache) == []


# ---------------------------------------------------------------------------
# Importer on a small hand-made copy
# ---------------------------------------------------------------------------


def _flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


def write_tiny_ml(src: Path) -> Path:
    src.mkdir(parents=True)
    (src / "u.data").write_text("1\t2\t5\t100\n2\t1\t3\t50\n1\t1\t4\t90\n")
    (src / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags(3, 4, 5)}\n"
            f"2|Café \"Noir\", The (1996)|01-Jan-1996||http://y|{_flags(0, 8)}\n"
            f"3|unknown||||{_flags(0)}\n"
        ).encode("latin-1")
    )
    (src / "u.user").write_text("1|24|M|technician|85711\n")
    return src


def test_import_tiny_copy_with_posters(tmp_path: Path) -> None:
    src = write_tiny_ml(tmp_path / "src")
    posters = tmp_path / "posters"
    posters.mkdir()
    (posters / "1.jpg").write_bytes(b"jpg1")
    (posters / "3.jpg").write_bytes(b"jpg3")
    out = import_ml100k(src, tmp_path / "out", posters)
    assert (out / "posters").is_symlink()
    assert (out / "items.csv").read_text(encoding="utf-8").splitlines() == [
        "item_id,title,genres,image",
        "1,Toy Story (1995),Animation|Children's|Comedy,posters/1.jpg",
        '2,"Café ""Noir"", The (1996)",Drama,',  # "unknown" dropped next to Drama
        "3,unknown,unknown,posters/3.jpg",  # "unknown" kept when alone
    ]
    assert (out / "interactions.csv").read_text().splitlines() == [
        "user_id,item_id,timestamp,rating",
        "1,2,100,5",
        "2,1,50,3",
        "1,1,90,4",
    ]
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["sha256"]["u.data"] == hashlib.sha256((src / "u.data").read_bytes()).hexdigest()
    assert source["original_sha256_ok"] is False

    ds = load_dataset(out)
    assert ds.user_ids == ["1", "2"] and ds.item_ids == ["1", "2", "3"]
    images = ds.media_paths("image")
    assert images[0] == out.absolute() / "posters" / "1.jpg" and images[0].read_bytes() == b"jpg1"
    assert images[1] is None and images[2] is not None

    # up to date: nothing is rewritten
    stamp = (out / "items.csv").stat().st_mtime_ns, (out / "items.csv").stat().st_ino
    assert import_ml100k(src, out, posters) == out
    assert ((out / "items.csv").stat().st_mtime_ns, (out / "items.csv").stat().st_ino) == stamp
    # a new poster makes it stale: re-imported, no temp folders left next to it
    (posters / "2.jpg").write_bytes(b"jpg2")
    import_ml100k(src, out, posters)
    assert "posters/2.jpg" in (out / "items.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "posters", "src"]
    # and without posters: no image column, no symlink
    import_ml100k(src, out, None)
    assert not (out / "posters").exists()
    assert (out / "items.csv").read_text().splitlines()[0] == "item_id,title,genres"


def test_import_rejects_broken_source(tmp_path: Path) -> None:
    src = write_tiny_ml(tmp_path / "src")
    (src / "u.item").write_text(f"1|x|||http://x|{_flags(1)}\n2|y|||http://y|2|0\n")
    with pytest.raises(DatasetError, match="u.item"):
        import_ml100k(src, tmp_path / "out", None)
    (src / "u.data").unlink()
    with pytest.raises(DatasetError, match="u.data: file not found"):
        import_ml100k(src, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()
