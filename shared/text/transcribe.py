"""Speech transcripts on the device with pocketsphinx's bundled English models (no download), and
subtitles (SRT, WebVTT) written from them.

The audio (or a video's audio track) is decoded by `shared.encoders.audio.decode` (16 kHz mono), cut
into speech segments by pocketsphinx's voice-activity segmenter, and each segment decoded with the
bundled acoustic model, language model and dictionary (`pocketsphinx/model/en-us/`). Word timings come
from the decoder's segmentation (100 frames per second). Words are grouped into cues of at most
`CUE_WORDS` words within one speech segment. Pocketsphinx is usable on clean speech and weak on names and
noise: on `Front_Center.wav` ("front center") it heard "rent center"; on music it hears words that are
not there, so a transcript says what the recogniser heard, not what was said.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.encoders.audio import SAMPLE_RATE, decode
from shared.encoders.errors import MediaError

VERSION = "pocketsphinx-5.1.1-en-us-v1"
CUE_WORDS = 10
FRAMES_PER_SECOND = 100
MAX_SECONDS = 600.0  # the same cap as the audio encoder


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float
    text: str


def _words(segment, decoder) -> list[tuple[float, float, str]]:
    out = []
    for seg in decoder.seg():
        word = seg.word.split("(", 1)[0]  # "what(2)": the dictionary's second pronunciation of "what"
        if word.startswith(("<", "[")):  # <s>, </s>, <sil>, [NOISE], [SPEECH]: fillers, not words
            continue
        out.append((segment.start_time + seg.start_frame / FRAMES_PER_SECOND,
                    segment.start_time + (seg.end_frame + 1) / FRAMES_PER_SECOND, word))
    return out


@functools.lru_cache(maxsize=1)
def _decoder():
    from pocketsphinx import Decoder

    return Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")  # loads the models: about a second, once


def transcribe(path: str | Path, max_seconds: float = MAX_SECONDS) -> list[Cue]:
    """Timed cues of the speech in an audio or video file ([] when none is heard). MediaError if the
    file has no decodable audio."""
    from pocketsphinx import Segmenter

    pcm = np.concatenate(list(decode(path, max_seconds)))
    raw = (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    decoder = _decoder()
    cues: list[Cue] = []
    for segment in Segmenter(sample_rate=SAMPLE_RATE).segment(io.BytesIO(raw)):
        decoder.start_utt()
        decoder.process_raw(segment.pcm, full_utt=True)
        decoder.end_utt()
        words = _words(segment, decoder)
        for i in range(0, len(words), CUE_WORDS):
            group = words[i : i + CUE_WORDS]
            cues.append(Cue(group[0][0], group[-1][1], " ".join(w for _, _, w in group)))
    return cues


def transcript_text(cues: list[Cue]) -> str:
    return " ".join(c.text for c in cues)


def _timestamp(seconds: float, separator: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def to_srt(cues: list[Cue]) -> str:
    return "".join(f"{i}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{c.text}\n\n"
                   for i, c in enumerate(cues, 1))


def to_webvtt(cues: list[Cue]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{c.text}\n\n" for c in cues)


def write_subtitles(cues: list[Cue], path: str | Path) -> Path:
    """Cues as an SRT or WebVTT file, chosen by the suffix (.srt, .vtt)."""
    path = Path(path)
    formats = {".srt": to_srt, ".vtt": to_webvtt}
    if path.suffix.lower() not in formats:
        raise MediaError(f"{path}: subtitle suffix {path.suffix!r}; expected .srt or .vtt")
    path.write_text(formats[path.suffix.lower()](cues))
    return path


def cached_transcript(path: str | Path, cache_dir: str | Path | None = None) -> list[Cue]:
    """`transcribe(path)`, kept on the device's disk under the file's sha256 (decoding costs seconds per
    second of audio): `<cache>/transcripts/<sha256>-<VERSION>.json`, written atomically."""
    import json
    import os
    import tempfile

    from shared.encoders.cache import file_digest
    from shared.paths import default_cache_dir

    out = Path(cache_dir or default_cache_dir()) / "transcripts" / f"{file_digest(path)}-{VERSION}.json"
    if out.is_file():
        try:
            return [Cue(*c) for c in json.loads(out.read_text())]
        except (ValueError, TypeError):
            out.unlink(missing_ok=True)  # damaged: recomputed rather than trusted
    cues = transcribe(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump([[c.start, c.end, c.text] for c in cues], handle)
    os.replace(tmp, out)
    return cues
