"""Keywords and sentiment of each item's text, computed on the device with offline libraries.

An item's text is its title and description, the words of its subtitle file, and the transcript of its
audio (or its video's audio track) where `transcripts` asks for one (`shared.text.transcribe`). Genres
and tags are tags already (`shared.serving.tags`) and are left out. Keywords: YAKE (statistical, no model,
lower score = more relevant), up to `TOP_KEYWORDS` phrases of at most two words. Sentiment: VADER's
compound score in [-1, 1] (lexicon and rules; its lexicon ships in the package). Both are kept per item
in the cache, keyed by the text, and feed interest tags and explanations.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.paths import default_cache_dir

VERSION = "yake-0.7.3-n2-top5/vader-3.3.2/v1"
TOP_KEYWORDS = 5
_YEAR = re.compile(r"\(\d{4}\)")  # MovieLens titles end in the release year: not a keyword


@dataclass(frozen=True)
class ItemText:
    keywords: list[str]
    sentiment: float  # VADER compound, -1 (negative) to 1 (positive); 0 for neutral or no text


@functools.lru_cache(maxsize=1)
def _extractors():
    import yake
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return yake.KeywordExtractor(lan="en", n=2, top=TOP_KEYWORDS, dedupLim=0.7), SentimentIntensityAnalyzer()


def analyse(text: str) -> ItemText:
    """Keywords (most relevant first, lower-cased) and sentiment of one text."""
    text = _YEAR.sub(" ", text).strip()
    if not text:
        return ItemText([], 0.0)
    keywords, vader = _extractors()
    found = [k.lower() for k, _ in sorted(keywords.extract_keywords(text), key=lambda kv: kv[1])]
    return ItemText(list(dict.fromkeys(found)), round(float(vader.polarity_scores(text)["compound"]), 4))


def item_text_for_analysis(dataset, cache_dir: str | Path | None = None, transcripts: bool = False) -> list[str]:
    """Each item's title, description, subtitle words and (with `transcripts`) speech transcript."""
    from shared.encoders.errors import MediaError
    from shared.encoders.subtitles import read_subtitles
    from shared.text.transcribe import cached_transcript, transcript_text

    def column(name: str) -> list[str]:
        values = dataset.items[name] if name in dataset.items.columns else [""] * dataset.n_items
        return ["" if v is None or v != v else str(v).strip() for v in values]  # v != v: NaN

    titles, descriptions = column("title"), column("description")
    subtitles = dataset.media_paths("subtitles")
    media = [a or v for a, v in zip(dataset.media_paths("audio"), dataset.media_paths("video"))]
    out = []
    for i in range(dataset.n_items):
        parts = [titles[i], descriptions[i]]
        try:
            if subtitles[i] is not None:
                parts.append(read_subtitles(subtitles[i]))
            elif transcripts and media[i] is not None:
                parts.append(transcript_text(cached_transcript(media[i], cache_dir)))
        except MediaError:
            pass  # the encoders count and report undecodable media; the item keeps its other text
        out.append(". ".join(p for p in parts if p))
    return out


def analyse_catalogue(texts: list[str], cache_dir: str | Path | None = None) -> list[ItemText]:
    """`analyse` of every text, kept in `<cache>/text-analysis/<sha256 of the texts>.json`."""
    digest = hashlib.sha256("\0".join([VERSION, *texts]).encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / "text-analysis" / f"{digest}.json"
    if path.is_file():
        try:
            return [ItemText(**row) for row in json.loads(path.read_text())]
        except (ValueError, TypeError):
            path.unlink(missing_ok=True)  # damaged: recomputed rather than trusted
    results = [analyse(t) for t in texts]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump([asdict(r) for r in results], handle)
    os.replace(tmp, path)
    return results
