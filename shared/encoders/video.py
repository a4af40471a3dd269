"""Video encoder: frames sampled with PyAV, embedded by the image backbone, pooled into one item vector.

Frames are taken at `frames` uniformly spaced times, each reached by seeking to the keyframe before it
and decoding forward, so a long video is never decoded or held whole: at most `max_decoded` frames are
decoded per video and only the sampled frames (scaled to a 256-pixel short side) are kept. Nearby sample times are reached by decoding on rather than seeking (a file with few keyframes would
otherwise decode its start again for every sample). With
`shots`, a first pass over a low-resolution grey copy of the frames finds shot changes (large jumps in
the mean absolute pixel difference between consecutive frames) and the first frame of each of the
`frames` strongest changes joins the sample; that pass also stops at `max_decoded` frames. The item
vector is the mean of the L2-normalised frame embeddings. The audio track goes to the audio encoder
(`shared.encoders.audio` decodes it from the same file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.encoders.errors import MediaError

VERSION = "seek-uniform-v1"
SHOT_THRESHOLD = 30.0  # mean absolute difference (0-255 grey levels) that marks a shot change
KEEP_SHORT_SIDE = 256
SEEK_GAP = 5.0  # seconds: a later frame closer than this is reached by decoding on, not by seeking


def encoder_id(image_encoder_id: str, frames: int, shots: bool) -> str:
    return f"video/{VERSION}/{frames}{'+shots' if shots else ''}/{image_encoder_id}"


def _open(path: str | Path):
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot open as video ({type(exc).__name__}: {exc})") from exc
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: no video stream (streams: {[s.type for s in container.streams] or 'none'})")
    return container


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def _keep(frame):
    """The frame as an RGB image scaled to a short side of 256 pixels (the backbone crops 224)."""
    scale = KEEP_SHORT_SIDE / max(1, min(frame.width, frame.height))
    if scale >= 1:
        return frame.to_image()
    return frame.to_image(width=max(1, round(frame.width * scale)), height=max(1, round(frame.height * scale)))


class VideoEncoder:
    def __init__(self, image_encoder, frames: int = 8, shots: bool = False, max_decoded: int = 3000) -> None:
        self.image = image_encoder
        self.frames = frames
        self.shots = shots
        self.max_decoded = max_decoded
        self.decoded = 0  # frames decoded by the last call (for the bound's test and the benchmark)

    def sample_frames(self, path: str | Path) -> list:
        """The sampled frames (PIL images) in time order; MediaError when none can be decoded."""
        import av

        self.decoded = 0
        self._position, self._decoder = None, None
        container = _open(path)
        try:
            stream = container.streams.video[0]
            duration = _duration(container, stream)
            times = [(k + 0.5) * duration / self.frames for k in range(self.frames)] if duration > 0 else [0.0]
            if self.shots:
                times = sorted(set(times) | set(self._shot_changes(container, stream)))
            images = [image for t in times if (image := self._frame_at(container, stream, t)) is not None]
        except av.error.FFmpegError as exc:
            raise MediaError(
                f"{path}: video stream {container.streams.video[0].codec_context.name!r} failed to decode "
                f"after {self.decoded} frames ({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            container.close()
        if not images:
            raise MediaError(f"{path}: no decodable video frame (decoded {self.decoded})")
        return images

    def _frame_at(self, container, stream, t: float):
        """The first frame at or after time t: decoding on from the current position when t is near
        (within `SEEK_GAP` seconds), else seeking to the keyframe before t first."""
        if self.decoded >= self.max_decoded:
            return None
        if self._position is None or t < self._position or t - self._position > SEEK_GAP:
            if stream.time_base is not None:
                container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
            self._decoder = container.decode(stream)
        last = None
        for frame in self._decoder:
            self.decoded += 1
            last = frame
            self._position = frame.time
            if frame.time is None or frame.time >= t or self.decoded >= self.max_decoded:
                break
        return _keep(last) if last is not None else None

    def _shot_changes(self, container, stream) -> list[float]:
        """Times of the `frames` strongest shot changes in the first `max_decoded` frames."""
        changes: list[tuple[float, float]] = []
        previous = None
        for frame in container.decode(stream):
            self.decoded += 1
            grey = frame.to_ndarray(format="gray", width=64, height=36).astype(np.float32)
            if previous is not None and frame.time is not None:
                diff = float(np.abs(grey - previous).mean())
                if diff > SHOT_THRESHOLD:
                    changes.append((diff, frame.time))
            previous = grey
            if self.decoded >= self.max_decoded // 2:  # keep half the budget for the sampled frames
                break
        self._position = None  # the sampled frames start with a seek
        return [t for _, t in sorted(changes, reverse=True)[: self.frames]]

    def embed_file(self, path: str | Path) -> np.ndarray:
        vectors = self.image.embed_images(self.sample_frames(path))
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.mean(axis=0).astype(np.float32)
