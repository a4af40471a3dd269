"""`avrec embed PATH`: embed a dataset directory, or a folder of media files, into the on-device cache.

Every vector is stored under the sha256 of its content and the encoder's id (weights included), so a
second run over the same items computes nothing, and a later `avrec simulate` finds them ready. Media
that cannot be decoded is listed and counted; the other items and modalities go on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from shared.data.dataset import Dataset, load_dataset
from shared.errors import RunFileError
from shared.features import COMPUTED, EncoderSettings, computed_keys, item_content

# A folder of media files: one item per file, its modality from the file's extension.
EXTENSIONS = {
    "image": {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"},
    "video": {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ogv"},
    "audio": {".wav", ".oga", ".ogg", ".opus", ".mp3", ".flac", ".m4a", ".aac", ".wma"},
}


def media_folder(root: Path) -> Dataset:
    """A catalogue (no interactions) of every media file under `root`, one item per file."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        kind = next((m for m, ext in EXTENSIONS.items() if path.suffix.lower() in ext), None)
        if kind:
            rows.append({"item_id": str(path.relative_to(root)), "title": path.stem, kind: str(path.relative_to(root))})
    if not rows:
        raise RunFileError(
            f"{root}: no media files found (extensions: {', '.join(sorted(set().union(*EXTENSIONS.values())))}) "
            "and no items.csv: expected a dataset directory or a folder of images, videos or audio files"
        )
    items = pd.DataFrame(rows).fillna("")
    media = {m: [root / v if v else None for v in items[m]] for m in EXTENSIONS if m in items.columns}
    report = {f"{m}_files": sum(p is not None for p in paths) for m, paths in media.items()}
    interactions = pd.DataFrame({"user": [], "item": [], "timestamp": []})
    return Dataset(root, items, interactions, [], list(items["item_id"]), report, media, {})


def open_catalogue(path: Path) -> tuple[Dataset, str]:
    if (path / "items.csv").is_file():
        return load_dataset(path), "dataset"
    if path.is_dir():
        return media_folder(path), "media folder"
    raise RunFileError(f"{path}: not a directory; expected a dataset directory (items.csv) or a folder of media files")


def embed(
    path: Path, modalities: list[str] | None = None, cache_dir: str | None = None,
    settings: EncoderSettings = EncoderSettings(), progress: bool = True, log=print,
) -> dict[str, Any]:
    """Embed every item of `path` for the modalities it has (or those asked for); returns the counts."""
    dataset, kind = open_catalogue(path)
    if modalities is None:
        keys = computed_keys(dataset.items, sorted(COMPUTED), settings)
        modalities = sorted({k.split("-", 1)[0] for k in keys} - ({"text"} if kind == "media folder" else set()))
    bar = None
    if progress:
        from tqdm import tqdm

        def bar(what: str, total: int):
            return tqdm(total=total, desc=f"embed {what}", unit="item", leave=True)

    content = item_content(dataset, modalities, cache_dir, settings, **({"progress": bar} if bar else {}))
    failed = content.failures.get("failed", {})
    present = content.mask.sum(0).tolist()
    rows = {
        key: {"items_with_vector": int(n), "computed": content.computed_by.get(key, 0),
              "from_cache": int(n) - content.computed_by.get(key, 0) if key in content.computed_by else 0,
              "failed": failed.get(key, 0)}
        for key, n in zip(content.features, present)
    }
    log(f"avrec embed: {path} ({kind}, {dataset.n_items} items) in {content.seconds:.1f} s")
    for key, r in rows.items():
        log(f"  {key:<16} {r['items_with_vector']:>6} with a vector: {r['computed']} computed now, "
            f"{r['from_cache']} from the cache, {r['failed']} failed")
    for key, examples in content.failures.get("examples", {}).items():
        for message in examples:
            log(f"  failed ({key}): {message}")
    return {"items": dataset.n_items, "kind": kind, "features": rows, "computed": content.computed,
            "failures": content.failures, "seconds": content.seconds}


def _run(args: argparse.Namespace) -> int:
    from shared.cli import config_from_args

    from shared.data.resolve import BUILTIN, resolve_dataset

    cfg = config_from_args(args)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    path = resolve_dataset(cfg.replace(dataset=BUILTIN)) if str(args.path) == BUILTIN else args.path
    embed(path, modalities, cfg.cache_dir or None, EncoderSettings.from_config(cfg), progress=not args.quiet)
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "embed",
        help="embed a dataset directory or a folder of media files into the on-device cache",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("path", type=Path, help="dataset directory (items.csv), a folder of media files, or movielens-100k")
    parser.add_argument("--modalities", help=f"comma-separated, of {', '.join(sorted(COMPUTED))}; default: all the data has")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--config", type=Path, help="TOML file of settings (encoders: image-backbone, audio-encoder, video-frames, video-shots; cache-dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    parser.set_defaults(func=_run, dataset=None, out=None)
