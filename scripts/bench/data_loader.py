"""Decode throughput of ``ImageLoader``: N decode workers (``data.num_workers``) against the in-process loader.

Images: 640x512 JPEGs (quality 90) cut from the real photos that installed packages ship (scikit-learn's
china/flower, scikit-image's astronaut/coffee/rocket/..., matplotlib's grace_hopper, gradio's samples):
several crops and mirror images of each, so every file differs. Without any such package the images are
synthesised (noise + gradients + shapes, JPEG q=90) and the output says so.

Each run reads a folder of them into both stage-1 views (the 224 px encoder view and the 512 px decoder
view, as ``vilex pretrain`` at 512 px does), batch 16. One warm-up epoch (worker start, page cache) is not
timed: the workers' read-ahead ends with each epoch, so the timed epochs start from an empty pipeline. The
consumer reads one value per 4 KiB page of every batch (as a copy to the GPU would touch every page). The
worker counts run in turn, ``--rounds`` times (the machine's load drifts; the median is printed), the load
average is printed with them, and the first batches of every worker count are checked to be bit-identical
to the in-process ones.

Wall-clock ratios need free cores. The CPU time each process spends per image is printed too: it does not
depend on what else runs on the machine, and shows the work the workers add (pipes, copies) and the part
left in the main process, which is what bounds the ratio on an idle machine: in-process CPU per image
divided by max(main CPU, workers' CPU / N) per image.

    python scripts/bench/data_loader.py                      # 0 vs 1 vs 2 workers
    python scripts/bench/data_loader.py --workers 1 2 4 8 15 --images 480
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vilex.data import FolderSource, ImageLoader, ViewConfig

WIDTH, HEIGHT, QUALITY = 640, 512, 90
VIEWS = {"encoder": ViewConfig(size=224), "decoder": ViewConfig(size=512)}
# (package, file inside it): photographs, not drawings or microscopy; only those present are used.
PHOTOS = [
    ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
    ("skimage", "data/astronaut.png"), ("skimage", "data/coffee.png"), ("skimage", "data/rocket.jpg"),
    ("skimage", "data/chelsea.png"), ("skimage", "data/motorcycle_left.png"), ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/hubble_deep_field.jpg"), ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("gradio", "media_assets/images/groot.jpeg"), ("gradio", "media_assets/images/tower.jpg"),
    ("gradio", "media_assets/images/cheetah.jpg"),
]


def find_photos() -> list[Path]:
    """The shipped photos present in this environment (found without importing the packages)."""
    found = []
    for package, relative in PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            found.append(path)
    return found


def write_images(folder: Path, n: int, photos: list[Path]) -> None:
    """``n`` distinct 640x512 JPEGs: crops (and mirror images) of the photos scaled to cover the frame."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if photos:
            photo = Image.open(photos[i % len(photos)]).convert("RGB")
            scale = max(WIDTH / photo.width, HEIGHT / photo.height) * (1.0 + 0.25 * rng.random())
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
            left = int(rng.integers(0, photo.width - WIDTH + 1))
            top = int(rng.integers(0, photo.height - HEIGHT + 1))
            image = photo.crop((left, top, left + WIDTH, top + HEIGHT))
            if (i // len(photos)) % 2:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = synthetic_photo(rng)
        image.save(folder / f"img_{i:04d}.jpg", "JPEG", quality=QUALITY)


def synthetic_photo(rng: np.random.Generator) -> Image.Image:
    """Photo-like content when no photo is installed: smooth gradients, shapes and sensor-like noise."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([(x * rng.random() + y * rng.random()) % 256 for _ in range(3)], -1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def loader(folder: Path, workers: int, epochs: int, batch: int) -> ImageLoader:
    return ImageLoader(FolderSource(folder), views=VIEWS, batch_size=batch, seed=0, epochs=epochs, num_workers=workers)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def touch(batch) -> float:
    """Read one float per 4 KiB page of every view, as a consumer copying the batch would touch every page."""
    return sum(float(t.reshape(-1)[::1024].sum()) for t in batch.images.values())


def measure(folder: Path, workers: int, epochs: int, batch: int) -> tuple[float, float, float]:
    """(images/s, main-process CPU ms per image, workers' CPU ms per image) over ``epochs`` timed epochs after
    one untimed warm-up epoch."""
    with loader(folder, workers, epochs + 1, batch) as data:
        stream = iter(data)
        while data.epoch == 0:  # the warm-up epoch
            touch(next(stream))
        pids = data._pool.worker_pids if data._pool is not None else []
        workers_cpu = sum(cpu_seconds(pid) for pid in pids)
        start, start_cpu, images = time.perf_counter(), time.process_time(), 0
        for b in stream:
            touch(b)
            images += len(b)
        wall, main_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        workers_cpu = sum(cpu_seconds(pid) for pid in pids) - workers_cpu
    return images / wall, 1000 * main_cpu / images, 1000 * workers_cpu / images


def same_first_batches(folder: Path, workers: int, batch: int, n: int = 2) -> bool:
    """Whether the first ``n`` batches with ``workers`` equal the in-process ones, bit for bit."""
    with loader(folder, 0, 1, batch) as reference, loader(folder, workers, 1, batch) as ours:
        for a, b in zip(itertools.islice(reference, n), itertools.islice(ours, n)):
            if a.keys != b.keys or any(not torch.equal(a.images[v], b.images[v]) for v in VIEWS):
                return False
    return True


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare with 0")
    ap.add_argument("--images", type=int, default=96, help="JPEGs in the folder (one epoch)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="runs of every worker count, interleaved")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the in-process baseline uses one core, as each worker does
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    photos = find_photos()
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "images"
        write_images(folder, args.images, photos)
        kind = (f"cut from {len(photos)} real photos shipped in installed packages ({', '.join(p.name for p in photos)})"
                if photos else "SYNTHESISED (no shipped photos found): noise + gradients + shapes")
        mean_kib = sum(p.stat().st_size for p in folder.iterdir()) / args.images / 1024
        print(f"images: {args.images} JPEGs {WIDTH}x{HEIGHT} q{QUALITY} (mean {mean_kib:.0f} KiB), {kind}")
        print(f"views: encoder 224 px + decoder 512 px; batch {args.batch}; {args.epochs} timed epochs "
              f"({args.epochs * args.images} images) per run after a warm-up epoch; {args.rounds} rounds")
        print(f"machine: {cpus} usable CPUs; load average (1/5/15 min) before: {load_average()}")
        counts = [0, *args.workers]
        runs: dict[int, list[tuple[float, float, float]]] = {w: [] for w in counts}
        for round_ in range(args.rounds):
            for workers in counts:
                runs[workers].append(measure(folder, workers, args.epochs, args.batch))
            print(f"  round {round_ + 1}: " + ", ".join(f"{w} workers {runs[w][-1][0]:.1f} img/s" for w in counts)
                  + f"; load average {load_average()}")
        identical = {w: same_first_batches(folder, w, args.batch) for w in args.workers}
    print(f"load average after: {load_average()}")
    median = {w: [statistics.median(run[i] for run in runs[w]) for i in range(3)] for w in counts}
    baseline, baseline_cpu = median[0][0], median[0][1]
    print(f"CPU per image: in-process {baseline_cpu:.2f} ms; with workers: main process + workers (sum), "
          f"and the ratio an idle machine would allow")
    for workers in args.workers:
        _, main_cpu, workers_cpu = median[workers]
        bound = baseline_cpu / max(main_cpu, workers_cpu / min(workers, cpus or 1))
        print(f"  {workers} workers: {main_cpu:.2f} + {workers_cpu:.2f} ms (x{bound:.2f} on {min(workers, cpus or 1)} "
              f"free cores)")
    print(f"{'num_workers':>11}  {'ours img/s':>10}  {'in-process img/s':>16}  {'bit-identical':>13}  {'ratio':>6}")
    for workers in args.workers:
        ours = median[workers][0]
        print(f"{workers:>11}  {ours:>10.1f}  {baseline:>16.1f}  {identical[workers]!s:>13}  {ours / baseline:>5.2f}x")


if __name__ == "__main__":
    main()
