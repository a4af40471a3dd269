"""On-device encoders with their real weights and on real media: images, video, audio, subtitles, and
what happens to items whose media is corrupt (the files are damaged for real in tmp_path)."""

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.encoders import audio, image, subtitles, video
from shared.encoders.errors import MediaError, MissingWeightsError
from shared.paths import default_data_root

torch.set_num_threads(1)


def media_samples() -> Path:
    root = default_data_root()
    folder = root / "media-samples" if root else None
    if folder is None or not folder.is_dir():
        pytest.skip(f"the real media samples are not here ({folder}); set AVREC_DATA_DIR to ../shared/data")
    return folder


@pytest.fixture(scope="module")
def encoder():
    return image.ImageEncoder()


def coffee():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.coffee())


def test_conversion_renames_all_296_tensors_in_order_and_refuses_a_mismatch():
    import timm

    source = image._read_state_dict(image._efficientnet_lite0_file())
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    converted = image.convert_by_position(source, target)
    assert len(converted) == len(target) == 296
    assert list(converted) == list(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    assert converted["conv_stem.weight"] is source["_conv_stem.weight"]
    assert converted["classifier.weight"] is source["_fc.weight"]
    shuffled = dict(source)
    keys = list(shuffled)
    shuffled[keys[0]], shuffled[keys[1]] = shuffled[keys[1]], shuffled[keys[0]]  # same count, wrong order
    with pytest.raises(ValueError, match="tensor 0"):
        image.convert_by_position(shuffled, target)
    with pytest.raises(ValueError, match="295 tensors"):
        image.convert_by_position(dict(list(source.items())[:-1]), target)


def test_vision_encoder_classes_the_coffee_photo_as_espresso(encoder):
    probabilities = encoder.class_probabilities([coffee()])[0]
    assert int(probabilities.argmax()) == 967, "ImageNet class 967 is espresso: the pretrained weights did not load"
    assert probabilities[967] > 0.9
    vector = encoder.embed_images([coffee()])
    assert vector.shape == (1, 1280) and np.isfinite(vector).all()
    assert encoder.config["mean"] == (0.5, 0.5, 0.5)  # timm's data config of tf_efficientnet_lite0


def test_unknown_backbone_and_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="registered: efficientnet-lite0"):
        image.load_backbone("resnet-9000")
    image.register_backbone("test-missing", "resnet18", tmp_path / "nothing.pth")
    try:
        with pytest.raises(MissingWeightsError, match="weights file .*nothing.pth not found"):
            image.load_backbone("test-missing")
    finally:
        del image.BACKBONES["test-missing"]


def test_archery_video_yields_frame_and_audio_track_embeddings(encoder):
    path = media_samples() / "archery.mp4"
    sampler = video.VideoEncoder(encoder, frames=8)
    frames = sampler.sample_frames(path)
    assert len(frames) == 8 and frames[0].size == (320, 240)
    assert sampler.decoded <= 300  # seeking and decoding on, never more than the clip's 300 frames
    # The frames show archery: ImageNet's "bow" (456) is the top class of most of them.
    assert np.mean(encoder.class_probabilities(frames).argmax(1) == 456) >= 0.5
    vector = sampler.embed_file(path)
    assert vector.shape == (1280,) and np.isfinite(vector).all()
    track = audio.SpectralEncoder().embed_file(path)  # the AAC track of the same file
    assert track.shape == (168,) and np.isfinite(track).all() and abs(np.linalg.norm(track) - 1) < 1e-5
    seconds = sum(len(b) for b in audio.decode(path)) / audio.SAMPLE_RATE
    assert abs(seconds - 10.0) < 0.1


def test_video_decoding_is_bounded(encoder):
    sampler = video.VideoEncoder(encoder, frames=8, max_decoded=40)
    frames = sampler.sample_frames(media_samples() / "archery.mp4")
    assert sampler.decoded == 40 and 1 <= len(frames) < 8
    shots = video.VideoEncoder(encoder, frames=4, shots=True, max_decoded=1000)
    assert len(shots.sample_frames(media_samples() / "archery.mp4")) >= 4


def test_every_media_sample_embeds():
    spectral = audio.SpectralEncoder()
    files = sorted(media_samples().iterdir())
    assert {p.suffix for p in files} >= {".wav", ".oga", ".mp4"}
    vectors = {p.name: spectral.embed_file(p) for p in files}
    assert all(v.shape == (168,) and np.isfinite(v).all() for v in vectors.values())
    # Different sounds give different vectors: the noise is unlike the spoken word.
    assert np.linalg.norm(vectors["Noise.wav"] - vectors["Front_Center.wav"]) > 0.05


def test_pretrained_audio_encoder_loads_from_a_local_directory(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = tmp_path / "tiny-wav2vec2"
    with pytest.raises(MissingWeightsError, match="No audio encoder weights are installed"):
        audio.load_audio_encoder(str(folder))
    # Random weights, tiny configuration: this tests the loading path, not audio understanding.
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(folder)
    encoder = audio.load_audio_encoder(str(folder))
    assert encoder.dim == audio.dim_for(str(folder)) == 32
    assert audio.encoder_id(str(folder)).startswith("audio/tiny-wav2vec2/")
    vector = encoder.embed_file(media_samples() / "bell.oga")
    assert vector.shape == (32,) and np.isfinite(vector).all()


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def test_corrupt_media_gives_clear_errors(tmp_path, encoder):
    coffee().save(tmp_path / "coffee.jpg")
    data = (tmp_path / "coffee.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(4000))
    results = encoder.embed_files([tmp_path / "coffee.jpg", tmp_path / "truncated.jpg", tmp_path / "garbage.jpg"])
    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], MediaError) and "truncated.jpg: unreadable image" in str(results[1])
    assert isinstance(results[2], MediaError) and "cannot identify image file" in str(results[2])

    empty = write_wav(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(MediaError, match="zero-length audio"):
        audio.SpectralEncoder().embed_file(empty)
    with pytest.raises(MediaError, match="no audio stream"):
        audio.SpectralEncoder().embed_file(tmp_path / "coffee.jpg")  # FFmpeg opens a JPEG: a video stream only
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(1).bytes(4000))
    with pytest.raises(MediaError, match="garbage.mp4: cannot open as video"):
        video.VideoEncoder(encoder).embed_file(tmp_path / "garbage.mp4")
    with pytest.raises(MediaError, match="no decodable video frame"):
        video.VideoEncoder(encoder).embed_file(tmp_path / "garbage.jpg")  # FFmpeg's JPEG reader finds no frame
    with pytest.raises(MediaError, match="no video stream"):
        video.VideoEncoder(encoder).embed_file(empty)


SRT = """1
00:00:01,000 --> 00:00:03,500
<i>Hold the bow</i> steady.

2
00:00:04,000 --> 00:00:06,000
Aim at the target.
"""

VTT = """WEBVTT

NOTE written by hand
for this test

00:01.000 --> 00:03.500 align:start
{\\an8}Hold the bow steady.

00:04.000 --> 00:06.000
Aim at the target.
Aim at the target.
"""


def test_subtitles_keep_only_the_spoken_words(tmp_path):
    (tmp_path / "a.srt").write_text(SRT)
    (tmp_path / "a.vtt").write_text(VTT)
    assert subtitles.read_subtitles(tmp_path / "a.srt") == "Hold the bow steady. Aim at the target."
    assert subtitles.read_subtitles(tmp_path / "a.vtt") == "Hold the bow steady. Aim at the target."
    (tmp_path / "b.srt").write_text("just some text\n")
    with pytest.raises(MediaError, match="not an SRT or WebVTT"):
        subtitles.read_subtitles(tmp_path / "b.srt")
    words = " ".join(f"w{i}" for i in range(subtitles.CHUNK_WORDS * 40))
    parts = subtitles.chunks(words)
    assert len(parts) == subtitles.MAX_CHUNKS and parts[0].startswith("w0 ") and parts[-1].endswith(f"w{6000 - 1}")


def test_shot_changes_are_found_in_a_video_with_a_hard_cut(tmp_path):
    import av

    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w") as out:  # 3 s at 25 fps: dark until frame 40, then bright
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(75):
            pixels = np.full((48, 64, 3), 20 if i < 40 else 230, np.uint8)
            pixels[:, :8] = (i * 3) % 255  # a little motion that is not a cut
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    sampler = video.VideoEncoder(None, frames=2, shots=True)
    with av.open(str(path)) as container:
        assert sampler._shot_changes(container, container.streams.video[0]) == [1.6]
    assert len(sampler.sample_frames(path)) == 3  # 2 uniform frames (0.75 s, 2.25 s) and the cut at 1.6 s
    assert len(video.VideoEncoder(None, frames=2).sample_frames(path)) == 2
