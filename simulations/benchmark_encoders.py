"""Throughput of the on-device encoders on this CPU, next to the floor their arithmetic allows.

For each encoder: items per second (text: MovieLens titles; image: MovieLens posters; video: seconds of
video per second; audio: seconds of audio per second) with 1 and 2 torch threads. The floor: FLOPs per
item, counted with torch.utils.flop_counter.FlopCounterMode on the real inputs, divided by the matrix
multiply throughput measured here with the same thread count (the best this CPU sustains on dense
arithmetic); the spectral audio encoder runs in numpy, so its FLOPs are counted analytically (STFT, mel
filter bank, DCT). Then the speed-ups tried on the image encoder, each measured: batching,
torch.inference_mode against no_grad, channels-last memory format, and a compiled graph.

    python -m simulations.benchmark_encoders [--out runs/benchmark-encoders] [--posters 48] [--no-compile]

The machine is shared: the load average before and after is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from shared.paths import default_data_root


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed runs after one warm-up (the least disturbed by other processes)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_flops_per_second(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats=5)


def count_flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        run()
    return int(counter.get_total_flops())


def spectral_flops_per_second_of_audio() -> float:
    """Analytic count per second of 16 kHz audio: 100 frames of a 400-point real FFT (~2.5 N log2 N),
    power (3 per bin), a 64x201 mel filter bank, log, and a 20x64 DCT; plus the mean/std sums."""
    n_fft, bins, mels, mfcc = 400, 201, 64, 20
    per_frame = 2.5 * n_fft * math.log2(n_fft) + 3 * bins + 2 * mels * bins + mels + 2 * mfcc * mels + 4 * (mels + mfcc)
    return 100 * per_frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-encoders"))
    parser.add_argument("--posters", type=int, default=48)
    parser.add_argument("--titles", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    root = default_data_root()
    if root is None or not (root / "media-samples").is_dir() or not (root / "ml-100k-posters").is_dir():
        parser.error(f"needs ../shared/data with media-samples and ml-100k-posters (data root: {root})")

    from PIL import Image

    from shared.data.dataset import load_dataset
    from shared.data.movielens import movielens_100k
    from shared.encoders.audio import SpectralEncoder, decode
    from shared.encoders.image import ImageEncoder
    from shared.encoders.text import TextEncoder
    from shared.encoders.video import VideoEncoder

    load_before = os.getloadavg()
    titles = load_dataset(movielens_100k(root)).item_texts()[: args.titles]
    posters = sorted((root / "ml-100k-posters").glob("*.jpg"))[: args.posters]
    images = [Image.open(p).convert("RGB") for p in posters]
    video = root / "media-samples" / "archery.mp4"
    audio_files = sorted(p for p in (root / "media-samples").iterdir() if p.suffix in (".wav", ".oga"))
    audio_seconds = sum(sum(len(b) for b in decode(p)) for p in audio_files) / 16000
    video_seconds = 10.0
    text, vision = TextEncoder(batch_size=64), ImageEncoder()  # the defaults devices use
    spectral = SpectralEncoder()

    # FLOPs per item, counted on the real inputs.
    text_flops = count_flops(lambda: text.encode(titles)) / len(titles)  # as run: batches of 64, padded
    x = torch.stack([vision.transform(im) for im in images[:1]])
    image_flops = count_flops(lambda: vision.model.forward_head(vision.model.forward_features(x), pre_logits=True))
    frames_per_video_second = 8 / video_seconds
    flops = {
        "text (MovieLens titles, items/s)": text_flops,
        "image (posters, items/s)": image_flops,
        "video (archery.mp4, video s/s; 8 frames)": image_flops * frames_per_video_second,
        "audio spectral (samples, audio s/s)": spectral_flops_per_second_of_audio(),
    }

    rows, matmul = {}, {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        matmul[threads] = matmul_flops_per_second()
        measured = {
            "text (MovieLens titles, items/s)": len(titles) / best_seconds(lambda: text.encode(titles), 2),
            "image (posters, items/s)": len(images) / best_seconds(lambda: vision.embed_images(images), 2),
            "video (archery.mp4, video s/s; 8 frames)": video_seconds / best_seconds(
                lambda: VideoEncoder(vision, 8).embed_file(video), 3),
            "audio spectral (samples, audio s/s)": audio_seconds / best_seconds(
                lambda: [spectral.embed_file(p) for p in audio_files], 3),
        }
        for name, rate in measured.items():
            floor = matmul[threads] / flops[name]
            rows.setdefault(name, {"flops_per_item": flops[name]})[f"{threads} thread"] = {
                "measured_per_s": rate, "floor_per_s": floor, "fraction_of_floor": rate / floor}
        print(f"{threads} thread(s): matmul {matmul[threads] / 1e9:.1f} GFLOP/s; "
              + "; ".join(f"{k}: {v:.2f}" for k, v in measured.items()), flush=True)

    # Speed-ups tried on the image encoder (1 thread: what a simulated device gets).
    torch.set_num_threads(1)
    tensors = torch.stack([vision.transform(im) for im in images])
    model = vision.model.to(memory_format=torch.contiguous_format)  # the default layout first

    def run(batch_size: int, context, inputs=tensors, net=model) -> Callable[[], None]:
        def go():
            with context():
                for s in range(0, len(inputs), batch_size):
                    net.forward_head(net.forward_features(inputs[s : s + batch_size]), pre_logits=True)
        return go

    n = len(tensors)
    speedups = {
        "batch 1, no_grad": n / best_seconds(run(1, torch.no_grad), 2),
        "batch 1, inference_mode": n / best_seconds(run(1, torch.inference_mode), 2),
        "batch 16, no_grad": n / best_seconds(run(16, torch.no_grad), 2),
        "batch 16, inference_mode": n / best_seconds(run(16, torch.inference_mode), 2),
    }
    speedups["batch 4, inference_mode"] = n / best_seconds(run(4, torch.inference_mode), 2)
    last = model.to(memory_format=torch.channels_last)
    tensors_last = tensors.contiguous(memory_format=torch.channels_last)
    for size in (1, 4, 16):
        speedups[f"batch {size}, inference_mode, channels_last"] = n / best_seconds(
            run(size, torch.inference_mode, tensors_last, last), 2)
    model.to(memory_format=torch.contiguous_format)
    if not args.no_compile:
        try:
            started = time.perf_counter()
            compiled = torch.compile(model)
            with torch.inference_mode():
                compiled.forward_head(compiled.forward_features(tensors[:16]), pre_logits=True)
            compile_seconds = time.perf_counter() - started
            speedups["batch 16, inference_mode, torch.compile"] = n / best_seconds(
                run(16, torch.inference_mode, net=compiled), 2)
            speedups["torch.compile: first call incl. compiling (s; inductor's disk cache may be warm)"] = compile_seconds
        except Exception as exc:  # noqa: BLE001 - report what failed, keep the other figures
            speedups["torch.compile"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    load_after = os.getloadavg()

    lines = ["| encoder | FLOPs per item | 1 thread measured | 1 thread floor | 2 threads measured | 2 threads floor |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['flops_per_item'] / 1e6:.1f} M | {r['1 thread']['measured_per_s']:.2f} | "
                     f"{r['1 thread']['floor_per_s']:.1f} | {r['2 thread']['measured_per_s']:.2f} | "
                     f"{r['2 thread']['floor_per_s']:.1f} |")
    lines += ["", f"matmul 1024x1024 fp32: {matmul[1] / 1e9:.1f} GFLOP/s on 1 thread, {matmul[2] / 1e9:.1f} on 2",
              "", "| image encoder, 1 thread, posters | items/s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in speedups.items()]
    lines += ["", f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores, shared)"]
    text_table = "\n".join(lines)
    print(text_table)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "matmul_flops_per_s": matmul, "speedups": speedups, "load_before": load_before,
              "load_after": load_after, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "markdown": text_table,
              "inputs": {"titles": len(titles), "posters": len(images), "audio_seconds": audio_seconds,
                         "audio_files": [p.name for p in audio_files], "video_seconds": video_seconds}}
    (args.out / "encoders.json").write_text(json.dumps(record, indent=2))
    print(f"saved {args.out / 'encoders.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
