"""Media turned into text on the device: pocketsphinx transcripts of real speech, subtitles written from
them, the text-transcript feature, and keywords and sentiment of item text (all offline)."""

import shutil

import numpy as np
import pytest

from shared.data.dataset import load_dataset
from shared.encoders.subtitles import chunks, read_subtitles
from shared.encoders.text import TextEncoder
from shared.features import EncoderSettings, item_content
from shared.serving.tags import catalogue_tags
from shared.text.analysis import analyse, analyse_catalogue
from shared.text.transcribe import cached_transcript, transcript_text, write_subtitles
from tests.test_encoders import media_samples


@pytest.fixture(scope="module")
def speech_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    samples = media_samples()
    shutil.copy(samples / "Front_Center.wav", root / "speech.wav")  # says "front center"
    shutil.copy(samples / "phone-incoming-call.oga", root / "ring.oga")  # a ring tone: no speech
    (root / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "items.csv").write_text("item_id,title,audio\na,Channel check,speech.wav\nb,Ring,ring.oga\n"
                                    "c,Broken,garbage.wav\nd,Silent film,\n")
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},{i},{t}\n" for u in range(2) for t, i in enumerate("abcd")))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # shared, so each clip is transcribed once


def test_transcript_of_real_speech_and_its_subtitles(speech_dataset, cache, tmp_path):
    cues = cached_transcript(speech_dataset / "speech.wav", cache)
    words = transcript_text(cues)
    assert "center" in words.split()  # the bundled model hears "rent center" (NOTES.md: "brent center")
    assert all(0 <= c.start < c.end <= 1.5 for c in cues)
    for suffix in (".srt", ".vtt"):
        assert read_subtitles(write_subtitles(cues, tmp_path / f"speech{suffix}")) == words
    # Cached by the file's content: a second call reads the cache.
    assert list((cache / "transcripts").glob("*.json")) and cached_transcript(speech_dataset / "speech.wav", cache) == cues
    assert cached_transcript(speech_dataset / "ring.oga", cache) == []


def test_text_transcript_feature(speech_dataset, cache):
    dataset = load_dataset(speech_dataset)
    content = item_content(dataset, ["text"], cache, EncoderSettings(transcripts=True))
    assert list(content.features) == ["text", "text-transcript"]
    # Speech heard: present; a ring tone: no words, absent; undecodable: absent and counted; no audio: absent.
    assert content.mask[:, 1].tolist() == [1, 0, 0, 0]
    assert content.failures["failed"] == {"text-transcript": 1}
    words = transcript_text(cached_transcript(speech_dataset / "speech.wav", cache))
    expected = TextEncoder().encode(chunks(words)).mean(axis=0)
    np.testing.assert_allclose(content.features["text-transcript"][0].numpy(), expected / np.linalg.norm(expected), atol=1e-5)
    assert list(item_content(dataset, ["text"], cache).features) == ["text"]  # off unless asked for


def test_keywords_and_sentiment(tmp_path):
    happy = analyse("A heartwarming, wonderful story of friendship between a farm boy and a space pilot (1977)")
    grim = analyse("A grim, violent tale of murder and betrayal")
    assert happy.sentiment > 0.5 and grim.sentiment < -0.5
    assert "farm boy" in happy.keywords and "1977" not in " ".join(happy.keywords)
    assert analyse("   ").keywords == [] and analyse("(1995)").sentiment == 0.0
    texts = ["Star Wars (1977)", "Return of the Jedi (1983)"]
    first = analyse_catalogue(texts, tmp_path)
    assert first == analyse_catalogue(texts, tmp_path) and len(list((tmp_path / "text-analysis").iterdir())) == 1
    assert "star wars" in first[0].keywords
    items = load_dataset_items(["Action|Sci-Fi", "unknown"])
    assert catalogue_tags(items, [first[0].keywords, []]) == [sorted({"action", "sci-fi", *first[0].keywords}), []]


def load_dataset_items(genres):
    import pandas as pd

    return pd.DataFrame({"item_id": [str(i) for i in range(len(genres))], "title": ["x"] * len(genres), "genres": genres})
