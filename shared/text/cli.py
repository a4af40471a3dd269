"""`avrec transcribe MEDIA...`: speech transcripts on this machine, and subtitles where none exist."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _transcribe(args: argparse.Namespace) -> int:
    from shared.encoders.errors import MediaError
    from shared.text.transcribe import cached_transcript, transcript_text, write_subtitles

    failed = 0
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for path in args.media:
        if not path.is_file():
            print(f"avrec transcribe: {path}: no such file; expected an audio or video file", file=sys.stderr)
            failed += 1
            continue
        try:
            cues = cached_transcript(path, args.cache_dir)
        except (MediaError, OSError) as exc:
            print(f"avrec transcribe: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: {transcript_text(cues) or '(no speech heard)'}")
        for suffix in args.subtitles:
            target = (args.out or path.parent) / f"{path.stem}.{suffix}"
            if target.exists():
                print(f"  {target} exists: kept")
            elif cues:
                print(f"  wrote {write_subtitles(cues, target)}")
    return 1 if failed else 0


def register(commands) -> None:
    p = commands.add_parser("transcribe", help="speech transcripts of audio or video files (offline, pocketsphinx)",
                            description=__doc__.splitlines()[0])
    p.add_argument("media", type=Path, nargs="+", help="audio or video files")
    p.add_argument("--subtitles", action="append", default=[], choices=("srt", "vtt"),
                   help="also write <stem>.srt or .vtt beside each file (or in --out), unless one exists")
    p.add_argument("--out", type=Path, help="folder for the subtitle files")
    p.add_argument("--cache-dir", default="", help="transcript cache (default $AVREC_CACHE_DIR or ~/.cache/avrec)")
    p.set_defaults(func=_transcribe)
