"""Subtitle files (SRT, WebVTT) as item text: the spoken words of a video, embedded by the text encoder.

Cue numbers, timings, WebVTT headers, NOTE/STYLE/REGION blocks and markup (<i>, {\\an8}) are dropped;
repeated consecutive lines (roll-up captions) are kept once. The text is embedded in chunks of
`CHUNK_WORDS` words (MiniLM reads at most 256 tokens at once), at most `MAX_CHUNKS` chunks spread evenly
over the file, and the chunk vectors are averaged.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from shared.encoders.errors import MediaError

VERSION = "subtitles-v1"
CHUNK_WORDS = 150
MAX_CHUNKS = 32

_TIMING = re.compile(r"^\s*(\d+:)?\d{1,2}:\d{2}[.,]\d{1,3}\s*-->")
_MARKUP = re.compile(r"<[^>]*>|\{\\[^}]*\}")


def read_subtitles(path: str | Path) -> str:
    """The spoken text of an SRT or WebVTT file; MediaError if it is empty or not a subtitle file."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older SRT files are often Windows-1252/latin-1
    lines: list[str] = []
    cues = 0
    skipping = False  # inside a WebVTT NOTE, STYLE or REGION block
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = line.strip()
        if not stripped:
            skipping = False
            continue
        if stripped.startswith("WEBVTT") or skipping:
            continue
        if stripped.split(" ", 1)[0] in ("NOTE", "STYLE", "REGION"):
            skipping = True
            continue
        if _TIMING.match(stripped):
            cues += 1
            continue
        if stripped.isdigit():
            continue  # SRT cue number
        spoken = _MARKUP.sub("", stripped).strip()
        if spoken and (not lines or lines[-1] != spoken):
            lines.append(spoken)
    if cues == 0:
        raise MediaError(f"{path}: no subtitle cues (no 'start --> end' timing line): not an SRT or WebVTT file")
    if not lines:
        raise MediaError(f"{path}: {cues} subtitle cue(s) but no text")
    return " ".join(lines)


def chunks(text: str) -> list[str]:
    words = text.split()
    parts = [" ".join(words[i : i + CHUNK_WORDS]) for i in range(0, len(words), CHUNK_WORDS)]
    if len(parts) > MAX_CHUNKS:
        parts = [parts[int(i)] for i in np.linspace(0, len(parts) - 1, MAX_CHUNKS)]
    return parts


def embed_subtitles(path: str | Path, encoder) -> np.ndarray:
    """Mean of the text encoder's vectors of the file's chunks."""
    return encoder.encode(chunks(read_subtitles(path))).mean(axis=0).astype(np.float32)
