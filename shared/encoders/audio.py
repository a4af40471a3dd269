"""Audio encoders: spectral statistics that need no weights (the default), or a pretrained transformers
audio model loaded from a local directory.

Audio is decoded with PyAV (any container FFmpeg reads: WAV, Ogg Vorbis, the AAC track of an MP4...),
resampled to 16 kHz mono and streamed in blocks, so a long file never sits whole in memory; at most
`max_seconds` are read.

- `spectral`: per block a 64-band log-mel spectrogram (25 ms windows, 10 ms hop) and its 20 MFCCs; the
  item vector is their mean and standard deviation over all frames (64+64+20+20 = 168 values), each
  group scaled to unit length so loudness in dB does not swamp the shape of the spectrum.
- a directory: any `transformers` audio encoder saved with `save_pretrained` (e.g. wav2vec2, HuBERT, AST):
  its feature extractor and model; the item vector is the mean of the last hidden states over time,
  averaged over blocks of `block_seconds`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from shared.encoders.cache import file_digest
from shared.encoders.errors import MediaError, MissingWeightsError

SAMPLE_RATE = 16_000
SPECTRAL = "spectral"
N_MELS, N_MFCC = 64, 20
SPECTRAL_VERSION = "logmel64-mfcc20-meanstd-v1"


def decode(path: str | Path, max_seconds: float = 600.0, block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Mono float32 blocks at 16 kHz of the first audio stream, at most `max_seconds` in all.

    Raises MediaError for a file FFmpeg cannot open or decode, one without an audio stream, or one that
    holds no samples (zero-length).
    """
    import av

    block = int(block_seconds * SAMPLE_RATE)
    limit = int(max_seconds * SAMPLE_RATE)
    total = 0
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot open as audio/video ({type(exc).__name__}: {exc})") from exc
    with container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream (streams: {[s.type for s in container.streams] or 'none'})")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pending: list[np.ndarray] = []
        held = 0

        def frames():
            for frame in container.decode(stream):
                yield from resampler.resample(frame)
            yield from resampler.resample(None)  # flush

        try:
            for frame in frames():
                samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                samples = samples[: limit - total]
                pending.append(samples)
                held += len(samples)
                total += len(samples)
                while held >= block:
                    joined = np.concatenate(pending)
                    yield joined[:block]
                    pending, held = [joined[block:]], len(joined) - block
                if total >= limit:
                    break
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(
                f"{path}: audio stream {stream.codec_context.name!r} failed to decode after {total / SAMPLE_RATE:.1f} s "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if held:
            yield np.concatenate(pending)
    if total == 0:
        raise MediaError(f"{path}: the audio stream holds no samples (zero-length audio)")


class SpectralEncoder:
    """Log-mel and MFCC statistics: no weights, the same on every device."""

    dim = 2 * N_MELS + 2 * N_MFCC
    id = f"audio/{SPECTRAL}/{SPECTRAL_VERSION}"

    def __init__(self, max_seconds: float = 600.0) -> None:
        self.max_seconds = max_seconds

    def embed_file(self, path: str | Path) -> np.ndarray:
        import librosa

        sums = np.zeros(N_MELS + N_MFCC)
        squares = np.zeros(N_MELS + N_MFCC)
        count = 0
        for block in decode(path, self.max_seconds):
            if len(block) < 400:  # shorter than one analysis window (the last block of a file)
                block = np.pad(block, (0, 400 - len(block)))
            mel = librosa.feature.melspectrogram(
                y=block, sr=SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=N_MELS, center=False
            )
            log_mel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
            mfcc = librosa.feature.mfcc(S=log_mel, n_mfcc=N_MFCC)
            frames = np.concatenate([log_mel, mfcc]).astype(np.float64)  # (84, n_frames)
            sums += frames.sum(axis=1)
            squares += (frames**2).sum(axis=1)
            count += frames.shape[1]
        mean = sums / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        groups = [mean[:N_MELS], std[:N_MELS], mean[N_MELS:], std[N_MELS:]]
        return np.concatenate([g / (np.linalg.norm(g) or 1.0) / 2.0 for g in groups]).astype(np.float32)


def _model_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise MissingWeightsError(
            f"audio-encoder = {spec!r}: no pretrained audio model at {path} (expected config.json, the weights "
            f"and preprocessor_config.json saved by transformers' save_pretrained). No audio encoder weights are "
            f"installed on this machine. To provide some, on a machine with internet run e.g. "
            f"`python -c \"from transformers import AutoModel, AutoFeatureExtractor as F; n='facebook/wav2vec2-base'; "
            f"AutoModel.from_pretrained(n).save_pretrained('{path}'); F.from_pretrained(n).save_pretrained('{path}')\"` "
            f"and copy the directory here, or use audio-encoder = spectral (no weights needed)"
        )
    return path


class PretrainedAudioEncoder:
    """A transformers audio encoder from a local directory; mean of the last hidden states over time."""

    def __init__(self, spec: str, max_seconds: float = 600.0, block_seconds: float = 10.0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

        path = _model_dir(spec)
        self.extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
        rate = getattr(self.extractor, "sampling_rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            raise ValueError(f"{path}: the feature extractor expects {rate} Hz audio; avrec decodes at {SAMPLE_RATE} Hz")
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.dim = int(AutoConfig.from_pretrained(path, local_files_only=True).hidden_size)
        self.id = encoder_id(spec)
        self.max_seconds, self.block_seconds = max_seconds, block_seconds
        self._torch = torch

    def embed_file(self, path: str | Path) -> np.ndarray:
        torch = self._torch
        pooled, weights = [], []
        with torch.inference_mode():
            for block in decode(path, self.max_seconds, self.block_seconds):
                inputs = self.extractor(block, sampling_rate=SAMPLE_RATE, return_tensors="pt")
                hidden = self.model(**inputs).last_hidden_state  # (1, time, hidden)
                pooled.append(hidden.mean(dim=1)[0].float().numpy())
                weights.append(len(block))
        return np.average(np.stack(pooled), axis=0, weights=weights).astype(np.float32)


def load_audio_encoder(spec: str = SPECTRAL):
    return SpectralEncoder() if spec == SPECTRAL else PretrainedAudioEncoder(spec)


@functools.lru_cache(maxsize=8)
def encoder_id(spec: str = SPECTRAL) -> str:
    """Names the encoder and its exact weights, for cache keys."""
    if spec == SPECTRAL:
        return SpectralEncoder.id
    path = _model_dir(spec)
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    digest = "-".join(file_digest(p)[:8] for p in weights)
    return f"audio/{path.name}/{digest}"


@functools.lru_cache(maxsize=8)
def dim_for(spec: str = SPECTRAL) -> int:
    if spec == SPECTRAL:
        return SpectralEncoder.dim
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(_model_dir(spec), local_files_only=True).hidden_size)
