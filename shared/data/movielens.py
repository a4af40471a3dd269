"""MovieLens-100K: locate or download the original GroupLens files and import them.

The import writes the generic dataset format of :mod:`shared.data.dataset`:
``interactions.csv`` (user_id,item_id,timestamp,rating), ``items.csv``
(item_id,title,genres[,image]) and ``SOURCE.json`` (source checksums). Posters, when
available, are linked in through a ``posters`` symlink inside the dataset directory.

The data itself is never part of the repository: it is read from a data root
(``AVREC_DATA_DIR`` or ``<repo>/../shared/data``) or downloaded into a cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from shared.paths import default_cache_dir, default_data_root

from .dataset import DatasetError

__all__ = [
    "ML100K_URL",
    "ML100K_SHA256",
    "ML100K_GENRES",
    "default_data_root",
    "default_cache_dir",
    "locate_or_download_ml100k",
    "import_ml100k",
    "movielens_100k",
]

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
#: sha256 of the original files (from the data README of this project).
ML100K_SHA256: dict[str, str] = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
}
#: Genre names in flag order (the content of ``u.genre``), used when u.genre is absent.
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

_EXTRACT = ("u.data", "u.item", "u.user", "u.genre")
_ZIP_PREFIX = "ml-100k/"
_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_MAX_MEMBER_BYTES = 32 * 1024 * 1024
_IMPORT_FORMAT_VERSION = 1
_CHUNK = 1 << 16


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(directory: Path, likely_cause: str) -> dict[str, str]:
    """Check the sha256 of u.data/u.item/u.user in ``directory``; return them."""
    sums: dict[str, str] = {}
    for name, expected in ML100K_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise DatasetError(
                f"{path}: file not found; expected the original MovieLens-100K file {name} "
                f"(sha256 {expected}). Likely cause: {likely_cause}",
                file=path,
            )
        actual = _sha256(path)
        if actual != expected:
            raise DatasetError(
                f"{path}: sha256 mismatch for {name}: expected {expected}, got {actual}. "
                f"Likely cause: {likely_cause}",
                file=path,
            )
        sums[name] = actual
    return sums


def _download(url: str, dest_dir: Path, timeout: float) -> Path:
    """Download ``url`` to a temporary file inside ``dest_dir`` and return its path."""
    fd, tmp_name = tempfile.mkstemp(prefix=".ml-100k.zip.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = 0
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > _MAX_DOWNLOAD_BYTES:
                    raise DatasetError(
                        f"{url}: download exceeds {_MAX_DOWNLOAD_BYTES} bytes; expected the ~5 MB "
                        f"ml-100k.zip. Likely cause: wrong URL.",
                        file=url,
                    )
                out.write(chunk)
    except DatasetError:
        tmp.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise DatasetError(
            f"{url}: download failed ({exc}); expected the MovieLens-100K zip. Likely cause: no "
            f"internet access or a wrong URL; alternatively set AVREC_DATA_DIR to a folder "
            f"containing ml-100k/ with the original files.",
            file=url,
        ) from None
    return tmp


def _extract(zip_path: Path, dest: Path, url: str) -> None:
    """Extract the needed members of the ml-100k zip into ``dest`` (names chosen by us)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = {info.filename: info for info in zf.infolist()}
            for name in _EXTRACT:
                info = members.get(_ZIP_PREFIX + name)
                if info is None:
                    if name == "u.genre":
                        continue  # optional; the importer has the genre list built in
                    raise DatasetError(
                        f"{url}: zip member {_ZIP_PREFIX + name} not found; expected the official "
                        f"ml-100k.zip layout. Likely cause: wrong URL or a different archive.",
                        file=url,
                    )
                if info.file_size > _MAX_MEMBER_BYTES:
                    raise DatasetError(
                        f"{url}: zip member {info.filename} is {info.file_size} bytes; expected at "
                        f"most {_MAX_MEMBER_BYTES}. Likely cause: a different archive.",
                        file=url,
                    )
                # The target name is one of ours, never taken from the archive: no traversal.
                with zf.open(info) as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise DatasetError(
            f"{url}: not a valid zip file ({exc}); expected ml-100k.zip. Likely cause: an "
            f"interrupted download or an HTML error page served instead of the file.",
            file=url,
        ) from None


def locate_or_download_ml100k(
    data_root: Path | None,
    cache_dir: Path,
    url: str = ML100K_URL,
    timeout: float = 60.0,
) -> Path:
    """Return a directory holding the original MovieLens-100K files (checksums verified).

    Uses ``data_root / "ml-100k"`` when it exists, else a previous download in
    ``cache_dir / "ml-100k"``, else downloads the zip from ``url`` into ``cache_dir``,
    extracts u.data, u.item, u.user (and u.genre) and verifies them. On a checksum
    mismatch of a download nothing is left behind and DatasetError names the file, the
    expected and the actual sha256.
    """
    if data_root is not None:
        local = Path(data_root) / "ml-100k"
        if local.is_dir():
            _verify(local, "the local copy was modified or is a different MovieLens release; "
                           "restore the original files from ml-100k.zip.")
            return local
    cache_dir = Path(cache_dir)
    final = cache_dir / "ml-100k"
    if final.is_dir():
        try:
            _verify(final, "a corrupted cache.")
            return final
        except DatasetError:
            shutil.rmtree(final, ignore_errors=True)  # our own cache: replace it
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".ml-100k.", suffix=".tmp", dir=cache_dir))
    os.chmod(tmp_dir, 0o755)
    zip_path: Path | None = None
    try:
        zip_path = _download(url, cache_dir, timeout)
        _extract(zip_path, tmp_dir, url)
        try:
            _verify(tmp_dir, f"the file downloaded from {url} is corrupted, truncated or not the "
                             f"original GroupLens release (tampered mirror or proxy).")
        except DatasetError as exc:
            # Report the file as named in the archive, not the temporary path.
            msg = str(exc).replace(str(tmp_dir) + os.sep, f"{url}!{_ZIP_PREFIX}")
            raise DatasetError(msg, file=url) from None
        try:
            os.rename(tmp_dir, final)
        except OSError:
            if final.is_dir():  # a concurrent download won; use it
                shutil.rmtree(tmp_dir, ignore_errors=True)
                _verify(final, "a corrupted cache.")
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        if zip_path is not None:
            zip_path.unlink(missing_ok=True)
    return final


def _poster_ids(posters_dir: Path) -> set[str]:
    return {p[: -len(".jpg")] for p in os.listdir(posters_dir) if p.endswith(".jpg")}


def _source_record(src: Path, posters_dir: Path | None) -> dict[str, object]:
    sums = {name: _sha256(src / name) for name in ("u.data", "u.item", "u.user") if (src / name).is_file()}
    if (src / "u.genre").is_file():
        sums["u.genre"] = _sha256(src / "u.genre")
    record: dict[str, object] = {
        "dataset": "MovieLens-100K",
        "url": ML100K_URL,
        "format_version": _IMPORT_FORMAT_VERSION,
        "source_dir": str(src.resolve()),
        "sha256": sums,
        "original_sha256_ok": all(sums.get(k) == v for k, v in ML100K_SHA256.items()),
        "posters_dir": None,
    }
    if posters_dir is not None:
        ids = sorted(_poster_ids(posters_dir))
        record["posters_dir"] = str(posters_dir.resolve())
        record["posters_sha256_of_names"] = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    return record


def _read_genres(src: Path) -> list[str]:
    path = src / "u.genre"
    if not path.is_file():
        return list(ML100K_GENRES)
    names: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, idx = line.rpartition("|")
        if not sep or not idx.strip().isdigit():
            raise DatasetError(
                f"{path}: line {lineno}: cannot parse {line!r}; expected 'name|index'. Likely "
                f"cause: a modified u.genre.",
                file=path,
                line=lineno,
            )
        names[int(idx)] = name
    if sorted(names) != list(range(len(ML100K_GENRES))):
        raise DatasetError(
            f"{path}: genre indices {sorted(names)}; expected 0..{len(ML100K_GENRES) - 1}. Likely "
            f"cause: a modified u.genre.",
            file=path,
        )
    return [names[i] for i in range(len(ML100K_GENRES))]


def _read_u_data(src: Path) -> pd.DataFrame:
    path = src / "u.data"
    try:
        df = pd.read_csv(path, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
                         dtype=np.int64)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(
            f"{path}: cannot parse ({exc}); expected 4 tab-separated integers per line "
            f"(user, item, rating, timestamp). Likely cause: not the original u.data.",
            file=path,
        ) from None
    return df[["user_id", "item_id", "timestamp", "rating"]]


def _read_u_item(src: Path, genres: list[str]) -> pd.DataFrame:
    path = src / "u.item"
    cols = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *range(len(genres))]
    try:
        df = pd.read_csv(path, sep="|", header=None, names=cols, encoding="latin-1", dtype=str,
                         keep_default_na=False, quoting=3)  # QUOTE_NONE: titles contain quotes
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(
            f"{path}: cannot parse ({exc}); expected {len(cols)} '|'-separated fields per line. "
            f"Likely cause: not the original u.item.",
            file=path,
        ) from None
    flags = df[list(range(len(genres)))]
    bad = ~flags.isin(["0", "1"]).all(axis=1).to_numpy()
    if bad.any() or not df["item_id"].str.fullmatch(r"\d+").all():
        row = int(np.flatnonzero(bad)[0]) if bad.any() else 0
        raise DatasetError(
            f"{path}: line {row + 1}: bad item id or genre flags; expected an integer id and "
            f"{len(genres)} flags of 0/1. Likely cause: not the original u.item.",
            file=path,
            line=row + 1,
        )
    flag_arr = flags.to_numpy() == "1"
    unknown = genres.index("unknown") if "unknown" in genres else -1
    if unknown >= 0:
        others = np.delete(flag_arr, unknown, axis=1).any(axis=1)
        flag_arr[others, unknown] = False  # "unknown" only when nothing else is set
    names = np.array(genres, dtype=object)
    genre_str = ["|".join(names[row]) for row in flag_arr]
    return pd.DataFrame({"item_id": df["item_id"].to_numpy(), "title": df["title"].to_numpy(),
                         "genres": genre_str})


def import_ml100k(src: Path, out_dir: Path, posters_dir: Path | None) -> Path:
    """Write MovieLens-100K (original files in ``src``) in the generic format into ``out_dir``.

    Writes interactions.csv (user_id,item_id,timestamp,rating, u.data order), items.csv
    (item_id,title,genres[,image]) and SOURCE.json. With ``posters_dir`` a symlink
    ``out_dir/posters -> posters_dir`` is created and ``image`` is ``posters/<id>.jpg``
    where that poster exists (empty otherwise). The directory is written to a temporary
    sibling and renamed into place; an up-to-date ``out_dir`` is left untouched.
    Checksums of ``src`` are recorded, not enforced (see locate_or_download_ml100k).
    """
    src = Path(src)
    out_dir = Path(out_dir)
    posters_dir = None if posters_dir is None else Path(posters_dir)
    if posters_dir is not None and not posters_dir.is_dir():
        raise DatasetError(
            f"{posters_dir}: posters directory not found; expected a folder of <item id>.jpg "
            f"files. Likely cause: wrong path; pass posters_dir=None to import without images.",
            file=posters_dir,
        )
    for name in ("u.data", "u.item"):
        if not (src / name).is_file():
            raise DatasetError(
                f"{src / name}: file not found; expected the original MovieLens-100K files in "
                f"{src}. Likely cause: wrong source directory.",
                file=src / name,
            )
    record = _source_record(src, posters_dir)
    source_json = out_dir / "SOURCE.json"
    if source_json.is_file() and (out_dir / "interactions.csv").is_file() and (out_dir / "items.csv").is_file():
        try:
            if json.loads(source_json.read_text()) == record:
                return out_dir
        except (OSError, ValueError):
            pass

    genres = _read_genres(src)
    interactions = _read_u_data(src)
    items = _read_u_item(src, genres)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        if posters_dir is not None:
            os.symlink(posters_dir.resolve(), tmp / "posters", target_is_directory=True)
            have = _poster_ids(posters_dir)
            items["image"] = ["posters/" + i + ".jpg" if i in have else "" for i in items["item_id"]]
        interactions.to_csv(tmp / "interactions.csv", index=False)
        items.to_csv(tmp / "items.csv", index=False)
        (tmp / "SOURCE.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        old: Path | None = None
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            old.rmdir()
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def movielens_100k(
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    url: str = ML100K_URL,
) -> Path:
    """Locate or download MovieLens-100K and import it; return the dataset directory.

    ``data_root`` defaults to :func:`default_data_root`; ``cache_dir`` to env
    ``AVREC_CACHE_DIR`` or ``~/.cache/avrec``. Posters come from
    ``data_root / "ml-100k-posters"`` when present. The dataset is written to
    ``cache_dir / "datasets" / "ml-100k"``; load it with :func:`load_dataset`.
    """
    if data_root is None:
        data_root = default_data_root()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    src = locate_or_download_ml100k(data_root, cache, url)
    posters = None
    if data_root is not None and (Path(data_root) / "ml-100k-posters").is_dir():
        posters = Path(data_root) / "ml-100k-posters"
    return import_ml100k(src, cache / "datasets" / "ml-100k", posters)
