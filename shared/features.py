"""Item content features: the frozen per-modality embeddings the item tower projects.

Computed on the device from the dataset, each cached on disk by content and encoder version:
- `text`: title, genres, description and tags through MiniLM; `text-subtitles`: the item's subtitle file
  (SRT or WebVTT), embedded in chunks and averaged; `text-transcript` (setting `transcripts`): the speech
  of an item's audio or video that has no subtitle file, transcribed on the device, embedded the same way;
- `image`: the `image` file through a timm backbone (`shared.encoders.image`);
- `video`: frames sampled from the `video` file, embedded by the same backbone and pooled;
- `audio`: the `audio` file, or else the audio track of the `video` file (`shared.encoders.audio`);
or read from the dataset's precomputed `features/<modality>-<name>.npy` files. Each becomes one input of
the item tower's fusion; an item that lacks a modality (an all-zero row) is marked absent in the mask. A
media file that cannot be decoded costs the item that modality only, and is counted in `failures`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared.config import ConfigError
from shared.data.dataset import Dataset, load_dataset, load_items
from shared.encoders.cache import EmbeddingCache, file_digest
from shared.encoders.errors import FailureTally, MediaError
from shared.principal import principal_components

COMPUTED = {"text", "image", "video", "audio"}  # modalities with an on-device encoder
# The items.csv columns each computed feature reads.
SOURCES = {"text": (), "text-subtitles": ("subtitles",), "text-transcript": ("audio", "video"), "image": ("image",),
           "video": ("video",), "audio": ("audio",)}


@dataclass(frozen=True)
class EncoderSettings:
    """Which encoders compute the media modalities (RunConfig's image-backbone, audio-encoder, video-*)."""

    image_backbone: str = "efficientnet-lite0"
    audio_encoder: str = "spectral"  # "spectral" or a local directory holding a transformers audio model
    video_frames: int = 8
    video_shots: bool = False
    content_dim: int = 0  # principal components kept per modality (shared.principal); 0 keeps the encoder's width
    transcripts: bool = False  # the text-transcript feature

    @classmethod
    def from_config(cls, cfg: Any) -> "EncoderSettings":
        return cls(cfg.image_backbone, cfg.audio_encoder, cfg.video_frames, cfg.video_shots,
                   content_dim=cfg.content_dim, transcripts=cfg.transcripts)


@dataclass(frozen=True)
class ItemContent:
    features: dict[str, torch.Tensor]  # name -> (n_items, dim) float32
    mask: torch.Tensor  # (n_items, n_modalities) 1.0 where the item has that modality
    computed: int  # vectors computed in this call (0 when everything came from the cache)
    seconds: float
    failures: dict = field(default_factory=dict)  # FailureTally.as_dict(): media that could not be decoded
    computed_by: dict = field(default_factory=dict)  # feature key -> vectors computed in this call

    @functools.cached_property
    def history_rows(self) -> torch.Tensor:
        """Each item's row of a history sum (`shared.model.history_features`), computed once: every
        simulated device of a process shares the content and builds its model every round."""
        from shared.model import history_features

        return history_features(self.features, self.mask)


Progress = Callable[[str, int], Any]  # (what, total) -> an object with update(n) and close(), e.g. tqdm


def _no_progress(what: str, total: int):
    class _Silent:
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...

    return _Silent()


def _has_column(items, column: str) -> bool:
    return column in items.columns and bool((items[column].astype(str).str.strip() != "").any())


MODALITIES = ("text", "image", "video", "audio")


def expand_modalities(modalities: list[str], items, root: str | Path) -> list[str]:
    """`auto` stands for every modality the catalogue has: text, and each media modality with a non-empty
    column in items.csv (audio also from a video's track) or a features/<modality>-*.npy file. Decided from
    the catalogue alone, so server and devices agree."""
    if modalities != ["auto"]:
        return modalities
    files = {p.stem.split("-", 1)[0] for p in Path(root, "features").glob("*.npy")}
    has = {"text": True, "image": _has_column(items, "image"), "video": _has_column(items, "video"),
           "audio": _has_column(items, "audio") or _has_column(items, "video")}
    return [m for m in MODALITIES if has[m] or m in files]


def computed_keys(items, modalities: list[str], settings: EncoderSettings) -> dict[str, int]:
    """The computed feature keys and their widths, decided from `items.csv` alone (so a server that never
    sees media builds the same model as the devices): a media modality is computed when its column has
    at least one non-empty cell (audio also from a video column: the audio track)."""
    keys: dict[str, int] = {}
    if "text" in modalities:
        from shared.encoders.text import TextEncoder

        keys["text"] = TextEncoder.dim
        if _has_column(items, "subtitles"):
            keys["text-subtitles"] = TextEncoder.dim
        if settings.transcripts and (_has_column(items, "audio") or _has_column(items, "video")):
            keys["text-transcript"] = TextEncoder.dim
    if "image" in modalities and _has_column(items, "image"):
        from shared.encoders.image import embedding_dim

        keys["image"] = embedding_dim(settings.image_backbone)
    if "video" in modalities and _has_column(items, "video"):
        from shared.encoders.image import embedding_dim

        keys["video"] = embedding_dim(settings.image_backbone)
    if "audio" in modalities and (_has_column(items, "audio") or _has_column(items, "video")):
        from shared.encoders.audio import dim_for

        keys["audio"] = dim_for(settings.audio_encoder)
    return keys


def text_features(dataset: Dataset, cache: EmbeddingCache, progress: Progress = _no_progress) -> tuple[np.ndarray, int]:
    from shared.encoders import text

    texts = dataset.item_texts()
    encoder: list[text.TextEncoder] = []
    bar = progress("text", len(texts))

    def compute(indices: list[int]) -> np.ndarray:
        bar.update(len(texts) - len(indices))  # found in the cache
        if not encoder:
            encoder.append(text.TextEncoder())
        out = []
        for start in range(0, len(indices), 256):
            chunk = indices[start : start + 256]
            out.append(encoder[0].encode([texts[i] for i in chunk]))
            bar.update(len(chunk))
        return np.concatenate(out)

    try:
        vectors, computed = cache.embed_all(text.encoder_id(), [t.encode() for t in texts], compute, dim=text.TextEncoder.dim)
        if not encoder:
            bar.update(len(texts))  # everything came from the cache
        return vectors, computed
    finally:
        bar.close()


def one_by_one(embed: Callable[[Path], np.ndarray]) -> Callable[[list[Path]], list]:
    """A per-file encoder as a batch encoder that returns each file's MediaError instead of raising it."""

    def run(paths: list[Path]) -> list:
        out: list = []
        for path in paths:
            try:
                out.append(embed(path))
            except MediaError as exc:
                out.append(exc)
        return out

    return run


def _file_features(
    key: str,
    paths: list[Path | None],
    encoder_id: str,
    dim: int,
    make: Callable[[], Callable[[list[Path]], list]],
    cache: EmbeddingCache,
    tally: FailureTally,
    progress: Progress,
    batch: int = 1,
) -> tuple[np.ndarray, int]:
    """One vector per item from its file (zero row without one), cached by the file's sha256.

    `make()` builds the encoder only when something must be computed and returns `embed(paths)`, giving
    per file a vector or the MediaError that says why it could not be decoded: that item loses this
    modality only, and the tally counts it.
    """
    present = [i for i, p in enumerate(paths) if p is not None]
    contents = [file_digest(paths[i]).encode() for i in present]
    embed: list[Callable[[list[Path]], list]] = []
    bar = progress(key, len(present))

    def compute(indices: list[int]) -> list[np.ndarray | None]:
        bar.update(len(present) - len(indices))  # found in the cache
        if not embed:
            embed.append(make())
        out: list[np.ndarray | None] = []
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            for result in embed[0]([paths[present[j]] for j in chunk]):
                if isinstance(result, MediaError):
                    tally.add(key, str(result))
                    result = None
                out.append(result)
            bar.update(len(chunk))
        return out

    try:
        vectors, computed = cache.embed_all(encoder_id, contents, compute, dim=dim)
        if not embed:
            bar.update(len(present))  # everything came from the cache
    finally:
        bar.close()
    matrix = np.zeros((len(paths), dim), np.float32)
    if present:
        # Unit length like the text vectors, so no modality enters the fusion at a larger scale (pre-logits
        # of EfficientNet-Lite0 have norms of 11-25 on the posters); failed items stay all-zero (absent).
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        matrix[present] = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return matrix, computed


def _subtitle_features(dataset: Dataset, cache: EmbeddingCache, tally: FailureTally, progress: Progress):
    from shared.encoders import subtitles, text

    def make():
        encoder = text.TextEncoder()
        return one_by_one(lambda path: subtitles.embed_subtitles(path, encoder))

    return _file_features(
        "text-subtitles", dataset.media_paths("subtitles"), f"{text.encoder_id()}/{subtitles.VERSION}",
        text.TextEncoder.dim, make, cache, tally, progress,
    )


def _transcript_features(dataset: Dataset, cache: EmbeddingCache, tally: FailureTally, progress: Progress,
                         cache_dir: str | Path | None):
    """Items with audio (or a video's audio track) and no subtitle file: their transcript, embedded like
    subtitles; an item in which no speech is heard keeps a zero row (the modality is absent)."""
    from shared.encoders import subtitles, text
    from shared.text import transcribe

    media = [None if s is not None else (a or v) for s, a, v in
             zip(dataset.media_paths("subtitles"), dataset.media_paths("audio"), dataset.media_paths("video"))]

    def make():
        encoder = text.TextEncoder()

        def embed(path: Path) -> np.ndarray:
            words = transcribe.transcript_text(transcribe.cached_transcript(path, cache_dir))
            if not words:
                return np.zeros(text.TextEncoder.dim, np.float32)
            return encoder.encode(subtitles.chunks(words)).mean(axis=0).astype(np.float32)

        return one_by_one(embed)

    return _file_features("text-transcript", media, f"{text.encoder_id()}/{transcribe.VERSION}",
                          text.TextEncoder.dim, make, cache, tally, progress)


def media_features(
    key: str, dataset: Dataset, settings: EncoderSettings, cache: EmbeddingCache, tally: FailureTally,
    progress: Progress = _no_progress,
) -> tuple[np.ndarray, int]:
    """The computed `image`, `video` or `audio` features of every item."""
    if key == "image":
        from shared.encoders import image

        return _file_features("image", dataset.media_paths("image"), image.encoder_id(settings.image_backbone),
                              image.embedding_dim(settings.image_backbone),
                              lambda: image.ImageEncoder(settings.image_backbone).embed_files,
                              cache, tally, progress, batch=16)
    if key == "video":
        from shared.encoders import image, video

        def make():
            return one_by_one(video.VideoEncoder(image.ImageEncoder(settings.image_backbone),
                                                 settings.video_frames, settings.video_shots).embed_file)

        encoder_id = video.encoder_id(image.encoder_id(settings.image_backbone), settings.video_frames, settings.video_shots)
        return _file_features("video", dataset.media_paths("video"), encoder_id,
                              image.embedding_dim(settings.image_backbone), make, cache, tally, progress)
    if key == "audio":
        from shared.encoders import audio

        # The audio file where there is one, else the audio track of the video.
        paths = [a or v for a, v in zip(dataset.media_paths("audio"), dataset.media_paths("video"))]
        return _file_features("audio", paths, audio.encoder_id(settings.audio_encoder),
                              audio.dim_for(settings.audio_encoder),
                              lambda: one_by_one(audio.load_audio_encoder(settings.audio_encoder).embed_file),
                              cache, tally, progress)
    raise ConfigError(f"modalities: no on-device encoder for {key!r}; expected one of {', '.join(sorted(COMPUTED))}")


def item_content(
    dataset: Dataset,
    modalities: list[str],
    cache_dir: str | Path | None = None,
    settings: EncoderSettings = EncoderSettings(),
    progress: Progress = _no_progress,
) -> ItemContent:
    """Features for the requested modalities (or `auto`): computed ones, then every matching features/ file."""
    start = time.perf_counter()
    modalities = expand_modalities(modalities, dataset.items, dataset.root)
    cache = EmbeddingCache(cache_dir)
    tally = FailureTally()
    features: dict[str, np.ndarray] = {}
    computed = 0
    files = dataset.feature_files()
    computed_by: dict[str, int] = {}
    wanted = computed_keys(dataset.items, modalities, settings)
    for modality in modalities:
        for key in [k for k in wanted if k.split("-", 1)[0] == modality]:
            if key == "text":
                features[key], n = text_features(dataset, cache, progress)
            elif key == "text-subtitles":
                features[key], n = _subtitle_features(dataset, cache, tally, progress)
            elif key == "text-transcript":
                features[key], n = _transcript_features(dataset, cache, tally, progress, cache_dir)
            else:
                features[key], n = media_features(key, dataset, settings, cache, tally, progress)
            computed_by[key] = n
            computed += n
            for column in SOURCES[key]:
                if missing := dataset.report.get(f"missing_{column}_files", 0):
                    tally.add(key, f"{missing} file(s) named in column {column!r} of items.csv do not exist", missing)
        for name in sorted(files):
            if name.split("-", 1)[0] == modality and name not in features:
                features[name] = dataset.load_features(name)
        if not any(k == modality or k.startswith(f"{modality}-") for k in features):
            raise ConfigError(
                f"modalities: {modality!r} was requested but the dataset {dataset.root} has neither a non-empty "
                f"{modality!r} column in items.csv for the on-device encoder nor a "
                f"features/{modality}-<name>.npy file"
            )
    mask = np.stack([np.abs(v).sum(axis=1) > 0 for v in features.values()], axis=1)
    if settings.content_dim:
        features = {k: principal_components(v, m, settings.content_dim) for (k, v), m in zip(features.items(), mask.T)}
    return ItemContent(
        {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in features.items()},
        torch.from_numpy(mask.astype(np.float32)),
        computed,
        time.perf_counter() - start,
        tally.as_dict(),
        computed_by,
    )


@functools.lru_cache(maxsize=2)
def load_cached(
    dataset_dir: str, modalities: str, cache_dir: str, settings: EncoderSettings = EncoderSettings()
) -> tuple[Dataset, ItemContent]:
    """The dataset and its item content, loaded once per process (simulated devices share a process)."""
    dataset = load_dataset(dataset_dir)
    content = item_content(dataset, [m.strip() for m in modalities.split(",") if m.strip()], cache_dir or None, settings)
    return dataset, content


def catalogue_shapes(
    dataset_dir: str | Path, modalities: list[str], settings: EncoderSettings = EncoderSettings()
) -> tuple[int, dict[str, int]]:
    """Item count and per-modality content widths, read from the catalogue alone (`items.csv` and the
    headers of `features/*.npy`): what a server needs to build the model without seeing interactions."""
    root = Path(dataset_dir)
    items = load_items(root)
    modalities = expand_modalities(modalities, items, root)
    wanted = computed_keys(items, modalities, settings)
    dims: dict[str, int] = {}
    files = sorted((root / "features").glob("*.npy")) if (root / "features").is_dir() else []
    for modality in modalities:
        dims.update({k: d for k, d in wanted.items() if k.split("-", 1)[0] == modality})
        for path in files:
            if path.stem.split("-", 1)[0] == modality and path.stem not in dims:
                dims[path.stem] = int(np.load(path, mmap_mode="r").shape[1])
    if settings.content_dim:
        dims = {k: min(d, settings.content_dim) for k, d in dims.items()}
    return len(items), dims


def placeholder_content(n_items: int, dims: dict[str, int]) -> ItemContent:
    """Zero content of the right shapes: enough to build and aggregate the model, never to score."""
    features = {k: torch.zeros(n_items, d) for k, d in dims.items()}
    return ItemContent(features, torch.ones(n_items, len(dims)), 0, 0.0)
