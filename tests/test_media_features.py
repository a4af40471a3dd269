"""Media modalities end to end on a small dataset of real and deliberately damaged files: features, the
failure tally, the fusion's renormalisation, and `avrec embed` (a second run computes nothing)."""

import shutil

import numpy as np
import pytest
import torch

from shared.cli import main as avrec
from shared.config import RunConfig
from shared.data.dataset import load_dataset
from shared.embed import embed
from shared.features import catalogue_shapes, item_content
from shared.model import build_model
from tests.test_encoders import SRT, coffee, media_samples, write_wav

torch.set_num_threads(1)
MODALITIES = ["text", "image", "video", "audio"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    samples = media_samples()
    root = tmp_path_factory.mktemp("media-dataset")
    media = root / "media"
    media.mkdir()
    shutil.copy(samples / "archery.mp4", media / "archery.mp4")
    shutil.copy(samples / "bell.oga", media / "bell.oga")
    coffee().save(media / "coffee.jpg")
    data = (media / "coffee.jpg").read_bytes()
    (media / "truncated.jpg").write_bytes(data[: len(data) // 3])  # a download cut short
    (media / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(3000))  # not an image at all
    (media / "garbage.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    write_wav(media / "empty.wav", np.zeros(0))  # zero-length audio
    (media / "archery.srt").write_text(SRT)
    (root / "items.csv").write_text(
        "item_id,title,image,video,audio,subtitles\n"
        "a,Archery lesson,media/coffee.jpg,media/archery.mp4,,media/archery.srt\n"
        "b,Bell,media/truncated.jpg,,media/bell.oga,\n"
        "c,Noise,media/garbage.jpg,media/garbage.mp4,media/empty.wav,\n"
        "d,Plain,,,,\n"
        "e,Missing poster,media/missing.jpg,,,\n"
    )
    rows = [f"u{u},{i},{t}" for u in range(3) for t, i in enumerate("abcde")]
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return root


def test_each_modality_survives_the_others_failures(dataset_dir, tmp_path):
    dataset = load_dataset(dataset_dir)
    content = item_content(dataset, MODALITIES, tmp_path / "cache")
    assert list(content.features) == ["text", "text-subtitles", "image", "video", "audio"]
    assert [content.features[k].shape[1] for k in content.features] == [384, 384, 1280, 1280, 168]
    mask = dict(zip(content.features, content.mask.T.tolist()))
    assert mask == {
        "text": [1, 1, 1, 1, 1],
        "text-subtitles": [1, 0, 0, 0, 0],
        "image": [1, 0, 0, 0, 0],  # truncated, garbage and missing posters are absent, not zero-filled lies
        "video": [1, 0, 0, 0, 0],
        "audio": [1, 1, 0, 0, 0],  # a: the video's audio track; b: the .oga file; c: zero-length wav
    }
    failed = content.failures["failed"]
    assert failed == {"image": 3, "video": 1, "audio": 1}
    messages = " ".join(m for ms in content.failures["examples"].values() for m in ms)
    assert "truncated.jpg: unreadable image" in messages and "garbage.mp4: cannot open as video" in messages
    assert "empty.wav: the audio stream holds no samples" in messages and "do not exist" in messages
    assert content.computed == 5 + 1 + 1 + 1 + 2  # texts, subtitle, image, video, audio vectors
    for key, vectors in content.features.items():
        norms = vectors.norm(dim=1)[content.mask[:, list(content.features).index(key)] > 0]
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), key
    # The server derives the same shapes from items.csv alone.
    assert catalogue_shapes(dataset_dir, MODALITIES)[1] == {k: v.shape[1] for k, v in content.features.items()}


def test_fusion_renormalises_over_the_modalities_an_item_has(dataset_dir, tmp_path):
    content = item_content(load_dataset(dataset_dir), MODALITIES, tmp_path / "cache")
    model = build_model(content, 5, RunConfig(dp="none", id_embeddings="false"))
    tower = model.items
    with torch.no_grad():
        tower.modality_logits.weight.copy_(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]))
        plain = tower(torch.tensor([3]))[0]  # item d: text only
        text_only = torch.nn.functional.normalize(tower.projections[0](content.features["text"][3]), dim=-1)
        assert torch.allclose(plain, text_only, atol=1e-6)
        weights = tower.modality_weights()
        assert torch.allclose(weights, torch.softmax(torch.arange(5.0), 0))


def test_avrec_embed_twice_computes_nothing_the_second_time(dataset_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = embed(dataset_dir, cache_dir=str(cache), progress=False, log=lambda *_: None)
    assert first["computed"] == 10 and first["failures"]["failed"] == {"image": 3, "video": 1, "audio": 1}
    assert avrec(["embed", str(dataset_dir), "--quiet", "--set", f"cache-dir={cache}"]) == 0
    out = capsys.readouterr().out
    assert "image                 1 with a vector: 0 computed now, 1 from the cache, 3 failed" in out
    second = embed(dataset_dir, cache_dir=str(cache), progress=False, log=lambda *_: None)
    assert second["computed"] == 0
    assert all(r["computed"] == 0 for r in second["features"].values())
    # A folder of media files: one item per file, modality from the extension.
    folder = embed(media_samples(), cache_dir=str(cache), progress=False, log=lambda *_: None)
    assert folder["kind"] == "media folder" and folder["items"] == 9
    assert folder["features"]["audio"]["items_with_vector"] == 9 and folder["features"]["video"]["items_with_vector"] == 1


def test_precomputed_feature_files_join_the_computed_modalities(dataset_dir, tmp_path):
    root = tmp_path / "with-features"
    shutil.copytree(dataset_dir, root)
    (root / "features").mkdir()
    np.save(root / "features" / "audio-clap.npy", np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32))
    content = item_content(load_dataset(root), ["text", "audio"], tmp_path / "cache")
    assert list(content.features) == ["text", "text-subtitles", "audio", "audio-clap"]
    assert content.mask[:, 3].tolist() == [1, 1, 1, 1, 1]
    assert catalogue_shapes(root, ["text", "audio"])[1] == {"text": 384, "text-subtitles": 384, "audio": 168, "audio-clap": 12}
