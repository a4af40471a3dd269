"""Generic on-disk dataset format and its validating loader.

A dataset is a directory holding

* ``interactions.csv`` -- columns ``user_id,item_id,timestamp`` (extra columns such as
  ``rating`` are kept). Timestamps are integer unix seconds or ISO-8601 strings
  (naive ISO times are taken as UTC); both are parsed to int64 unix seconds. Optional behaviour columns
  (used by the `signals` setting, see `shared.data.signals`): ``event``, one of ``EVENTS`` (empty = play),
  and ``watch_fraction``, a number in [0, 1] (empty = unknown).
* ``items.csv`` -- ``item_id``, ``title`` (required), optional text columns
  ``description``, ``genres``, ``tags`` (lists separated by ``|``) and optional media
  columns ``image``, ``video``, ``audio`` and ``subtitles`` (an SRT or WebVTT file) holding paths
  relative to the directory.
* optionally ``features/<modality>-<name>.npy`` -- precomputed per-item embeddings,
  one row per item in ``items.csv`` order; modality is one of ``text``, ``image``,
  ``audio``, ``video``.

Every problem found while loading raises :class:`DatasetError`, whose message names the
file, the 1-based line (the header is line 1) or the column, the problem, what was
expected and the likely cause.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import UserError

__all__ = [
    "DatasetError",
    "Dataset",
    "load_dataset",
    "MEDIA_MODALITIES",
    "PATH_COLUMNS",
    "FEATURE_MODALITIES",
    "TEXT_COLUMNS",
    "EVENTS",
]

#: Media columns of ``items.csv`` (paths relative to the dataset directory).
MEDIA_MODALITIES: tuple[str, ...] = ("image", "video", "audio")
#: Every column of ``items.csv`` that holds a file path: the media plus subtitle files (text).
PATH_COLUMNS: tuple[str, ...] = MEDIA_MODALITIES + ("subtitles",)
#: Modalities allowed in ``features/<modality>-<name>.npy``.
FEATURE_MODALITIES: tuple[str, ...] = ("text", "image", "audio", "video")
#: Text columns of ``items.csv`` used by :meth:`Dataset.item_texts`, in output order.
TEXT_COLUMNS: tuple[str, ...] = ("title", "genres", "description", "tags")

#: Values of the optional ``event`` column of ``interactions.csv`` (behaviour signals).
EVENTS: tuple[str, ...] = ("like", "play", "skip", "dislike")

_INTERACTIONS = "interactions.csv"
_ITEMS = "items.csv"
_FEATURES = "features"
_FEATURE_NAME = re.compile(r"^(?P<modality>[A-Za-z0-9]+)-(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\.npy$")
_INT_RE = r"[+-]?\d+"
_NUMERIC_TS_RE = r"[+-]?\d+(?:\.\d*)?"
# Unix seconds beyond this (year ~5138) are rejected as implausible / overflow-prone.
_MAX_ABS_UNIX_SECONDS = 10**11
_MAX_LISTED = 5
# The longest cell accepted (characters). The text encoder reads at most 256 tokens (about 1,000 characters)
# of an item's text; a 27 MB title once took 4.9 GiB to tokenise. Documented in the README's dataset format.
MAX_CELL_CHARS = 20_000


class DatasetError(UserError, ValueError):
    """A dataset file is missing or malformed.

    The message names the file, the line (1-based, header = line 1) or column, the
    problem, what was expected and the likely cause. The same facts are available as
    the attributes ``file``, ``line`` and ``column`` (``None`` where not applicable).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.file = None if file is None else str(file)
        self.line = line
        self.column = column


# ---------------------------------------------------------------------------
# CSV reading helpers
# ---------------------------------------------------------------------------


def _line_numbers(path: Path, rows: np.ndarray) -> list[int]:
    """1-based starting line of the given 0-based data rows (header = line 1).

    Only used on error paths. Fast path: without quote characters every record is one
    physical line (blank lines are kept as rows by the reader), so row i is line i + 2.
    Otherwise the file is re-read with :mod:`csv` to account for quoted newlines.
    """
    rows = np.asarray(rows, dtype=np.int64)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if '"' not in text:
        return [int(r) + 2 for r in rows]
    starts: list[int] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    prev_end = 0
    for _ in reader:
        starts.append(prev_end + 1)
        prev_end = reader.line_num
    # starts[0] is the header; data row i starts at starts[i + 1]
    return [starts[int(r) + 1] if int(r) + 1 < len(starts) else int(r) + 2 for r in rows]


def _first_bad_field_count(path: Path, n_header: int) -> tuple[int, int] | None:
    """(line, n_fields) of the first record whose field count differs from the header."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    prev_end = 0
    for i, record in enumerate(reader):
        start = prev_end + 1
        prev_end = reader.line_num
        if i == 0 or not record:
            continue
        if len(record) != n_header:
            return start, len(record)
    return None


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a CSV as strings (empty cells -> ""), check required columns.

    Returns the frame (fully blank rows removed) and, for each remaining row, its
    0-based position among the data records in the file (for line numbers).
    """
    if not path.is_file():
        raise DatasetError(
            f"{path}: file not found; expected the {what} file '{path.name}' in dataset "
            f"directory {path.parent}. Likely cause: wrong dataset path, or the dataset "
            f"was not written/imported completely.",
            file=path,
        )
    try:
        df = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise DatasetError(
            f"{path}: line 1: file is empty; expected a header line with columns "
            f"{', '.join(required)}. Likely cause: an interrupted write.",
            file=path,
            line=1,
        ) from None
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        start = data.find(exc.object) if isinstance(exc.object, bytes) else -1
        offset = (start if start >= 0 else 0) + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise DatasetError(
            f"{path}: line {line}: byte 0x{data[offset]:02x} is not valid UTF-8; expected "
            f"a UTF-8 encoded CSV file. Likely cause: the file was saved in another "
            f"encoding (e.g. latin-1); re-save it as UTF-8.",
            file=path,
            line=line,
        ) from None
    except pd.errors.ParserError as exc:
        header = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()[:1]
        n_header = len(next(csv.reader(header))) if header else 0
        bad = _first_bad_field_count(path, n_header)
        where = f"line {bad[0]}: found {bad[1]} fields" if bad else f"cannot parse ({exc})"
        raise DatasetError(
            f"{path}: {where}; expected {n_header} comma-separated fields as in the header. "
            f"Likely cause: an unquoted comma or quote inside a value, or a truncated line.",
            file=path,
            line=bad[0] if bad else None,
        ) from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{path}: line 1 (header): missing required column(s) {', '.join(missing)}; "
            f"found columns {', '.join(map(repr, df.columns))}; expected at least "
            f"{', '.join(required)}. Likely cause: wrong header names, a different "
            f"delimiter than ',' or a missing header line.",
            file=path,
            line=1,
            column=missing[0],
        )
    positions = np.arange(len(df), dtype=np.int64)
    if len(df) and len(df.columns):
        blank = (df == "").all(axis=1).to_numpy()
        if blank.any():
            df = df.loc[~blank].reset_index(drop=True)
            positions = positions[~blank]
    if df.empty:
        raise DatasetError(
            f"{path}: no data lines after the header; expected at least one {what} line. Likely cause: an "
            f"export that wrote only the header, or the wrong file.",
            file=path,
            line=2,
        )
    for col in df.columns:
        long = np.flatnonzero((df[col].str.len() > MAX_CELL_CHARS).to_numpy())
        if len(long):
            line = _line_numbers(path, positions[long[:1]])[0]
            raise DatasetError(
                f"{path}: line {line}: column {col} holds {len(df[col].iloc[long[0]]):,} characters; expected at "
                f"most {MAX_CELL_CHARS:,} per cell (the text encoder reads about the first 1,000). Likely cause: "
                f"an unclosed quote that swallowed the rest of the file, or a whole document pasted into one cell.",
                file=path,
                line=line,
                column=col,
            )
    return df, positions


def _check_nonempty_ids(path: Path, df: pd.DataFrame, positions: np.ndarray, columns: tuple[str, ...]) -> None:
    for col in columns:
        df[col] = df[col].str.strip()
        empty = (df[col] == "").to_numpy()
        if empty.any():
            rows = np.flatnonzero(empty)
            lines = _line_numbers(path, positions[rows[:_MAX_LISTED]])
            more = f" (and {len(rows) - len(lines)} more)" if len(rows) > len(lines) else ""
            raise DatasetError(
                f"{path}: line {lines[0]}: empty {col}; expected a non-empty {col} on every "
                f"line (empty on line(s) {', '.join(map(str, lines))}{more}). Likely cause: a "
                f"missing value or a misplaced comma.",
                file=path,
                line=lines[0],
                column=col,
            )


def _parse_timestamps(path: Path, values: pd.Series, positions: np.ndarray) -> np.ndarray:
    """Parse integer unix seconds or ISO-8601 strings to int64 unix seconds (vectorised)."""
    s = values.str.strip()
    out = np.zeros(len(s), dtype=np.int64)
    numeric = s.str.fullmatch(_NUMERIC_TS_RE).to_numpy(dtype=bool)
    bad = np.zeros(len(s), dtype=bool)
    if numeric.any():
        num = pd.to_numeric(s[numeric], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(num) & (np.abs(num) <= _MAX_ABS_UNIX_SECONDS)
        idx = np.flatnonzero(numeric)
        bad[idx[~ok]] = True
        # Integers are exact; parse them as int64 to avoid float rounding.
        int_like = s[numeric].str.fullmatch(_INT_RE).to_numpy(dtype=bool) & ok
        if int_like.any():
            out[idx[int_like]] = s[numeric][int_like].astype(np.int64).to_numpy()
        frac = ok & ~int_like
        out[idx[frac]] = np.floor(num[frac]).astype(np.int64)
    rest = ~numeric
    if rest.any():
        dt = pd.to_datetime(s[rest], format="ISO8601", utc=True, errors="coerce")
        valid = dt.notna().to_numpy()
        idx = np.flatnonzero(rest)
        bad[idx[~valid]] = True
        if valid.any():
            secs = (dt[valid] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
            out[idx[valid]] = secs.to_numpy(dtype=np.int64)
    if bad.any():
        rows = np.flatnonzero(bad)
        lines = _line_numbers(path, positions[rows[:_MAX_LISTED]])
        raise DatasetError(
            f"{path}: line {lines[0]}: unparsable timestamp {values.iloc[rows[0]]!r} in "
            f"column timestamp ({len(rows)} bad value(s), on line(s) "
            f"{', '.join(map(str, lines))}{' ...' if len(rows) > len(lines) else ''}); "
            f"expected integer unix seconds (e.g. 881250949) or an ISO-8601 date/time "
            f"(e.g. 2020-01-31T12:00:00Z). Likely cause: another date format or a "
            f"misplaced column.",
            file=path,
            line=lines[0],
            column="timestamp",
        )
    return out


def _first_bad(path: Path, positions: np.ndarray, bad: np.ndarray) -> tuple[int, int]:
    """The first flagged row and its line in the file, for an error that names it."""
    row = int(np.flatnonzero(bad)[0])
    return row, _line_numbers(path, positions[[row]])[0]


def _check_signals(path: Path, raw: pd.DataFrame, positions: np.ndarray) -> None:
    """The optional behaviour columns: ``event`` in EVENTS (normalised to lower case in place), and
    ``watch_fraction`` a number in [0, 1]; empty cells are allowed in both."""
    if "event" in raw.columns:
        raw["event"] = raw["event"].str.strip().str.lower()
        bad = ~raw["event"].isin(EVENTS + ("",)).to_numpy()
        if bad.any():
            row, line = _first_bad(path, positions, bad)
            raise DatasetError(
                f"{path}: line {line}: event {raw['event'].iloc[row]!r} ({int(bad.sum())} unknown value(s)); expected "
                f"one of {', '.join(EVENTS)} or empty (= play). Likely cause: another event vocabulary; map it to "
                f"these four.", file=path, line=line, column="event")
    if "watch_fraction" in raw.columns:
        text = raw["watch_fraction"].str.strip()
        value = pd.to_numeric(text.where(text != ""), errors="coerce").to_numpy(dtype=float)
        bad = (text != "").to_numpy() & ~((value >= 0.0) & (value <= 1.0))  # NaN (unparsable) is bad too
        if bad.any():
            row, line = _first_bad(path, positions, bad)
            raise DatasetError(
                f"{path}: line {line}: watch_fraction {text.iloc[row]!r} ({int(bad.sum())} such value(s)); expected "
                f"a number in [0, 1] or empty. Likely cause: a percentage (0-100) or seconds watched instead of "
                f"a fraction.", file=path, line=line, column="watch_fraction")


def _maybe_numeric(col: pd.Series) -> pd.Series:
    """Convert an extra column to numbers when every non-empty cell is numeric."""
    nonempty = col != ""
    if not nonempty.any():
        return col
    num = pd.to_numeric(col.where(nonempty), errors="coerce")
    if num[nonempty].isna().any():
        return col
    if nonempty.all() and col.str.strip().str.fullmatch(_INT_RE).all():
        return num.astype(np.int64)
    return num.astype(np.float64)


def _sort_ids(ids: np.ndarray) -> list[str]:
    """Sort ids numerically when all are integers, else as strings."""
    s = pd.Series(ids, dtype=str)
    if len(s) and s.str.fullmatch(_INT_RE).all():
        return sorted(s.tolist(), key=lambda v: (int(v), v))
    return sorted(s.tolist())


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded, validated dataset (see the module docstring for the format).

    ``interactions`` has columns ``user`` (int64 index into ``user_ids``), ``item``
    (int64 index into ``item_ids``), ``timestamp`` (int64 unix seconds) plus the extra
    columns of ``interactions.csv``, sorted by (user, timestamp, file order), with
    duplicate (user, item) pairs removed (the earliest is kept).
    """

    root: Path
    items: pd.DataFrame
    interactions: pd.DataFrame
    user_ids: list[str]
    item_ids: list[str]
    report: dict[str, int]
    _media: dict[str, list[Path | None]] = field(default_factory=dict, repr=False)
    _features: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def n_users(self) -> int:
        """Number of distinct users."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of items (rows of items.csv)."""
        return len(self.item_ids)

    def item_texts(self) -> list[str]:
        """One descriptive string per item, built from whichever text columns exist.

        E.g. ``"Toy Story (1995). Genres: Animation, Children's, Comedy. <description>.
        Tags: a, b."``; empty or missing parts are omitted; ``|``-separated lists are
        joined with ``", "``.
        """
        cols = {c: self._text_column(c) for c in TEXT_COLUMNS}
        texts: list[str] = []
        for i in range(self.n_items):
            parts: list[str] = []
            for col, prefix in (("title", ""), ("genres", "Genres: "), ("description", ""), ("tags", "Tags: ")):
                value = cols[col][i]
                if not value:
                    continue
                if col in ("genres", "tags"):
                    value = ", ".join(p.strip() for p in value.split("|") if p.strip())
                    if not value:
                        continue
                part = prefix + value
                if part[-1] not in ".!?":
                    part += "."
                parts.append(part)
            texts.append(" ".join(parts))
        return texts

    def _text_column(self, col: str) -> list[str]:
        if col not in self.items.columns:
            return [""] * self.n_items
        values = self.items[col].astype(object).where(self.items[col].notna(), "")
        return [str(v).strip() for v in values]

    def media_paths(self, modality: str) -> list[Path | None]:
        """Absolute paths of the ``image``/``video``/``audio``/``subtitles`` files, one per item.

        ``None`` where the cell is empty or the file does not exist. A dataset without
        that column gives all ``None``.
        """
        if modality not in PATH_COLUMNS:
            raise ValueError(f"unknown media modality {modality!r}; expected one of {', '.join(PATH_COLUMNS)}")
        return list(self._media.get(modality, [None] * self.n_items))

    def feature_files(self) -> dict[str, Path]:
        """Precomputed feature files: key ``"<modality>-<name>"`` -> path of the .npy file."""
        return dict(self._features)

    def load_features(self, key: str) -> np.ndarray:
        """Load ``features/<key>.npy`` as float32 ``(n_items, dim)``.

        Raises DatasetError if the key is unknown, the file is unreadable, the array is not
        2-D, its row count differs from the number of items, or it holds NaN/inf.
        """
        if key not in self._features:
            raise DatasetError(
                f"{self.root / _FEATURES / (key + '.npy')}: no such feature file; expected one of "
                f"{', '.join(sorted(self._features)) or '(none)'}. Likely cause: the features "
                f"were not computed for this dataset or the key is misspelled.",
                file=self.root / _FEATURES / (key + ".npy"),
            )
        path = self._features[key]
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any read failure is a dataset problem
            raise DatasetError(
                f"{path}: cannot read as a .npy array ({exc}); expected a numeric array saved "
                f"with numpy.save. Likely cause: a truncated or non-numpy file.",
                file=path,
            ) from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            raise DatasetError(
                f"{path}: array has shape {getattr(arr, 'shape', None)}; expected a 2-D array "
                f"(n_items={self.n_items}, dim). Likely cause: features saved per item or "
                f"flattened.",
                file=path,
            )
        if arr.shape[0] != self.n_items:
            raise DatasetError(
                f"{path}: array has {arr.shape[0]} rows; expected {self.n_items} (one per row of "
                f"items.csv, in file order). Likely cause: features computed for another "
                f"version of items.csv.",
                file=path,
            )
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise DatasetError(
                f"{path}: array dtype is {arr.dtype}; expected real numbers (float32). Likely "
                f"cause: the wrong array was saved.",
                file=path,
            )
        out = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(out)
        if not finite.all():
            row = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise DatasetError(
                f"{path}: row {row} (item_id {self.item_ids[row]!r}) holds NaN or infinite values "
                f"({int((~finite).sum())} in total); expected finite numbers. Likely cause: a "
                f"failed encoder run or values too large for float32.",
                file=path,
                line=row,
            )
        return out


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _load_items(root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    path = root / _ITEMS
    items, positions = _read_csv(path, ("item_id", "title"), "items")
    _check_nonempty_ids(path, items, positions, ("item_id",))
    dup = items["item_id"].duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        first_id = items["item_id"].iloc[rows[0]]
        same = np.flatnonzero((items["item_id"] == first_id).to_numpy())
        lines = _line_numbers(path, positions[same[:_MAX_LISTED]])
        n_ids = items["item_id"][dup].nunique()
        raise DatasetError(
            f"{path}: line {lines[1]}: duplicate item_id {first_id!r} (also on line {lines[0]}; "
            f"{n_ids} duplicated id(s) in total); expected each item_id exactly once. Likely "
            f"cause: items appended twice or ids that differ only in surrounding spaces.",
            file=path,
            line=lines[1],
            column="item_id",
        )
    return items.reset_index(drop=True), positions


def load_items(root: str | Path) -> pd.DataFrame:
    """The catalogue alone (items.csv), checked and read exactly as `load_dataset` reads it, so that a server
    that sees only the catalogue counts the same items as its devices (a stray blank row once split them)."""
    return _load_items(Path(root))[0]


def _check_media(root: Path, items: pd.DataFrame, positions: np.ndarray, report: dict[str, int]) -> dict[str, list[Path | None]]:
    path = root / _ITEMS
    media: dict[str, list[Path | None]] = {}
    for modality in PATH_COLUMNS:
        if modality not in items.columns:
            continue
        values = items[modality].str.strip()
        nonempty = (values != "").to_numpy()
        escapes = (
            values.str.startswith("/")
            | values.str.startswith("\\")
            | values.str.match(r"^[A-Za-z]:")
            | values.str.contains(r"(?:^|[/\\])\.\.(?:[/\\]|$)", regex=True)
        ).to_numpy(dtype=bool) & nonempty
        if escapes.any():
            row = int(np.flatnonzero(escapes)[0])
            line = _line_numbers(path, positions[[row]])[0]
            raise DatasetError(
                f"{path}: line {line}: column {modality}: path {values.iloc[row]!r} escapes the "
                f"dataset directory; expected a relative path inside {root} (no leading '/', "
                f"no drive letter, no '..'). Likely cause: absolute paths written by an "
                f"exporter; make them relative or link the media folder into the dataset.",
                file=path,
                line=line,
                column=modality,
            )
        out: list[Path | None] = [None] * len(values)
        missing = 0
        present = 0
        # Lexical join only: a symlinked sub-folder inside the dataset is allowed.
        for i in np.flatnonzero(nonempty):
            p = root / values.iloc[i]
            if p.is_file():
                out[i] = p
                present += 1
            else:
                missing += 1
        report[f"{modality}_files"] = present
        report[f"missing_{modality}_files"] = missing
        media[modality] = out
    return media


def _find_features(root: Path) -> dict[str, Path]:
    fdir = root / _FEATURES
    if not fdir.exists():
        return {}
    if not fdir.is_dir():
        raise DatasetError(
            f"{fdir}: is not a directory; expected a folder of <modality>-<name>.npy files. "
            f"Likely cause: a stray file named 'features'.",
            file=fdir,
        )
    found: dict[str, Path] = {}
    for entry in sorted(fdir.iterdir()):
        if entry.name.startswith("."):
            continue
        m = _FEATURE_NAME.match(entry.name)
        if not entry.is_file() or m is None:
            raise DatasetError(
                f"{entry}: bad feature file name {entry.name!r}; expected a file named "
                f"<modality>-<name>.npy with modality one of {', '.join(FEATURE_MODALITIES)} "
                f"(e.g. image-clip.npy). Likely cause: a misnamed or non-.npy file in features/.",
                file=entry,
            )
        if m.group("modality") not in FEATURE_MODALITIES:
            raise DatasetError(
                f"{entry}: unknown feature modality {m.group('modality')!r}; expected one of "
                f"{', '.join(FEATURE_MODALITIES)} (file <modality>-<name>.npy). Likely cause: a "
                f"typo such as 'images-' or 'txt-'.",
                file=entry,
            )
        found[entry.name[: -len(".npy")]] = entry
    return found


def load_dataset(path: str | Path) -> Dataset:
    """Load and validate a dataset directory (see the module docstring for the format).

    Duplicate (user, item) interactions keep the earliest (by timestamp, then file order);
    the rest are dropped and counted in ``report["duplicate_interactions_dropped"]``.
    Media paths that do not exist are set to ``None`` and counted in
    ``report["missing_<modality>_files"]``. Raises :class:`DatasetError` on bad input.
    """
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset directory not found; expected a directory holding "
            f"{_INTERACTIONS} and {_ITEMS}. Likely cause: wrong path or the dataset was "
            f"not imported yet.",
            file=root,
        )
    report: dict[str, int] = {}

    items, item_positions = _load_items(root)
    item_ids = items["item_id"].tolist()
    report["items_read"] = len(items)
    media = _check_media(root, items, item_positions, report)
    features = _find_features(root)

    ipath = root / _INTERACTIONS
    raw, positions = _read_csv(ipath, ("user_id", "item_id", "timestamp"), "interactions")
    report["interactions_read"] = len(raw)
    _check_nonempty_ids(ipath, raw, positions, ("user_id", "item_id"))

    item_index = pd.Index(item_ids).get_indexer(raw["item_id"])
    unknown = item_index < 0
    if unknown.any():
        rows = np.flatnonzero(unknown)
        line = _line_numbers(ipath, positions[rows[:1]])[0]
        n_distinct = raw["item_id"].iloc[rows].nunique()
        raise DatasetError(
            f"{ipath}: line {line}: item_id {raw['item_id'].iloc[rows[0]]!r} is not in "
            f"{root / _ITEMS} ({len(rows)} interaction(s) with {n_distinct} unknown item id(s)); "
            f"expected every interaction's item_id to be listed in items.csv. Likely cause: "
            f"items.csv is out of date or filtered, or ids are formatted differently "
            f"(e.g. '007' vs '7').",
            file=ipath,
            line=line,
            column="item_id",
        )
    timestamps = _parse_timestamps(ipath, raw["timestamp"], positions)
    _check_signals(ipath, raw, positions)

    user_ids = _sort_ids(raw["user_id"].unique())
    user_index = pd.Index(user_ids).get_indexer(raw["user_id"])

    order = np.lexsort((np.arange(len(raw)), timestamps, user_index))
    frame = pd.DataFrame(
        {
            "user": user_index[order].astype(np.int64),
            "item": item_index[order].astype(np.int64),
            "timestamp": timestamps[order],
        }
    )
    for col in raw.columns:
        if col in ("user_id", "item_id", "timestamp") or col in frame.columns:
            continue
        frame[col] = _maybe_numeric(raw[col]).to_numpy()[order]
    dup = frame.duplicated(subset=["user", "item"], keep="first").to_numpy()
    report["duplicate_interactions_dropped"] = int(dup.sum())
    if dup.any():
        frame = frame.loc[~dup]
    frame = frame.reset_index(drop=True)
    report["interactions"] = len(frame)
    report["users"] = len(user_ids)
    report["items"] = len(item_ids)

    return Dataset(
        root=root,
        items=items,
        interactions=frame,
        user_ids=user_ids,
        item_ids=item_ids,
        report=report,
        _media=media,
        _features=features,
    )
