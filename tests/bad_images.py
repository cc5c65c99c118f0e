"""bad_images.py — the bad-image zoo: tiny good images in every mode plus every way a file can be broken.

``zoo()`` returns the images (bytes + the skip reason each must get, None for good ones). The
``write_*`` helpers lay the same zoo out as each source type reads it and return the exact counts a
loader must report: a folder, parquet (Image feature and plain bytes), json with a path column, a
``save_to_disk`` folder and webdataset tar shards. Everything is built in memory from Pillow, so the
tests need no files from the outside world.

Decode with ``ZOO_MAX_PIXELS`` and ``ZOO_MIN_SIDE``: every good image is at least 8 px a side and
below 2048 pixels, ``big.png`` (64x64) is over it, ``tiny.png`` (1x1) under the min side.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ZOO_MAX_PIXELS = 2048
ZOO_MIN_SIDE = 8


@dataclass(frozen=True)
class ZooImage:
    name: str  # file stem and sample key
    ext: str  # file extension without the dot
    data: bytes
    reason: str | None  # expected skip reason; None for a good image

    @property
    def file_name(self) -> str:
        return f"{self.name}.{self.ext}"


@dataclass
class Expected:
    """What a loader over a written zoo must report."""

    good: int
    skips: dict[str, int] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        return sum(self.skips.values())


# ----------------------------------------------------------------------------- image builders
def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient_rgb(width: int = 16, height: int = 12) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def noise_rgb(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    """Incompressible pixels, so cutting the file in half really cuts image data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def rgba_with_transparent_corner() -> Image.Image:
    """16x12 red, half-transparent, with a fully transparent BLACK pixel at (0, 0)."""
    pixels = np.zeros((12, 16, 4), dtype=np.uint8)
    pixels[..., 0], pixels[..., 3] = 255, 128
    pixels[0, 0] = (0, 0, 0, 0)
    return Image.fromarray(pixels)


def grey16() -> Image.Image:
    """16x12 I;16 ramp whose (0, 0) pixel is 65535 and (1, 0) is 0."""
    values = np.full((12, 16), 1000, dtype=np.uint16)
    values[0, 0], values[0, 1] = 65535, 0
    return Image.fromarray(values)


def exif_rotated_jpeg() -> bytes:
    """Stored 16 wide x 8 high, left half red / right half blue, EXIF orientation 6 (rotate 90° CW)."""
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    im = Image.new("P", (12, 12), 1)
    im.putpalette([0, 0, 0, 0, 255, 0])
    im.putpixel((0, 0), 0)
    return encode(im, "PNG", transparency=0)


def animated_gif() -> bytes:
    """Two frames, red then blue: decoding must give the red first frame."""
    red, blue = Image.new("RGB", (12, 12), (255, 0, 0)), Image.new("RGB", (12, 12), (0, 0, 255))
    return encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb by its header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zoo() -> list[ZooImage]:
    """Good images in every mode, then one file per way of being broken (no unreadable ones: see writers)."""
    jpeg_noise, png_noise = encode(noise_rgb(seed=1), "JPEG"), encode(noise_rgb(seed=2), "PNG")
    return [
        ZooImage("rgb", "jpg", encode(gradient_rgb(), "JPEG"), None),
        ZooImage("grey_L", "png", encode(gradient_rgb().convert("L"), "PNG"), None),
        ZooImage("grey_alpha_LA", "png", encode(gradient_rgb().convert("LA"), "PNG"), None),
        ZooImage("palette_P", "png", palette_with_transparency(), None),
        ZooImage("rgba", "png", encode(rgba_with_transparent_corner(), "PNG"), None),
        ZooImage("cmyk", "jpg", encode(gradient_rgb().convert("CMYK"), "JPEG"), None),
        ZooImage("grey16_I16", "png", encode(grey16(), "PNG"), None),
        ZooImage("exif_rotated", "jpg", exif_rotated_jpeg(), None),
        ZooImage("animated", "gif", animated_gif(), None),
        ZooImage("rgb_webp", "webp", encode(gradient_rgb(), "WEBP"), None),
        ZooImage("rgb_bmp", "bmp", encode(gradient_rgb(), "BMP"), None),
        ZooImage("truncated_jpeg", "jpg", jpeg_noise[: len(jpeg_noise) // 2], "truncated"),
        ZooImage("truncated_png", "png", png_noise[: len(png_noise) // 2], "truncated"),
        ZooImage("empty", "jpg", b"", "empty"),
        ZooImage("text", "jpg", b"this is a text file, not a JPEG\n", "not_an_image"),
        ZooImage("bomb_header", "png", png_claiming_size(100_000, 100_000), "decompression_bomb"),
        ZooImage("big", "png", encode(gradient_rgb(64, 64), "PNG"), "decompression_bomb"),
        ZooImage("tiny", "png", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "too_small"),
    ]


def zoo_expected(extra_skips: dict[str, int] | None = None) -> Expected:
    """Counts for the zoo itself plus a writer's extra broken entries."""
    images = zoo()
    skips: dict[str, int] = {}
    for image in images:
        if image.reason:
            skips[image.reason] = skips.get(image.reason, 0) + 1
    for reason, count in (extra_skips or {}).items():
        skips[reason] = skips.get(reason, 0) + count
    return Expected(good=sum(image.reason is None for image in images), skips=dict(sorted(skips.items())))


def caption(image: ZooImage) -> str:
    return f"a picture called {image.name}"


# ----------------------------------------------------------------------------- writers, one per source type
def write_folder(root: Path) -> Expected:
    """Zoo files in ``root`` (half in a subfolder), ``metadata.jsonl`` captions, a broken symlink and a
    folder named like an image (2 x unreadable: tests run as root, so chmod 000 would not block reads)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    rows = []
    for i, image in enumerate(zoo()):
        relative = f"sub/{image.file_name}" if i % 2 else image.file_name
        (root / relative).write_bytes(image.data)
        rows.append({"file_name": relative, "caption": caption(image)})
    (root / "notes.txt").write_text("not an image extension: not listed\n")
    os.symlink(root / "does_not_exist.png", root / "broken_link.jpg")
    (root / "folder_named.jpg").mkdir()
    rows += [{"file_name": "broken_link.jpg", "caption": "a dangling link"},
             {"file_name": "folder_named.jpg", "caption": "a folder, not a file"}]
    (root / "masks").mkdir()  # side files not named in metadata.jsonl are not samples
    (root / "masks" / "mask_0.png").write_bytes(zoo()[0].data)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return zoo_expected({"unreadable": 2})


def _image_feature_table(with_null: bool):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    images = zoo()
    column = [{"bytes": image.data, "path": None} for image in images]
    captions = [caption(image) for image in images]
    if with_null:
        column.append(None)
        captions.append("a row without an image")
    return Dataset.from_dict({"image": column, "caption": captions},
                             features=Features({"image": ImageFeature(), "caption": Value("string")}))


def write_parquet_image_feature(path: Path) -> Expected:
    """Parquet with an ``Image`` feature column (bytes embedded) plus one null image (-> empty)."""
    _image_feature_table(with_null=True).to_parquet(str(path))
    return zoo_expected({"empty": 1})


def write_parquet_bytes(path: Path, column: str = "jpg") -> Expected:
    """Parquet written by pyarrow with a plain binary column named ``column`` (no HF features)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = zoo()
    table = pa.table({column: [image.data for image in images], "caption": [caption(i) for i in images]})
    pq.write_table(table, path)
    return zoo_expected()


def write_json_paths(path: Path) -> Expected:
    """JSON lines with a path column relative to the json file; plus a missing file and a folder (unreadable)."""
    image_dir = path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for image in zoo():
        (image_dir / image.file_name).write_bytes(image.data)
        rows.append({"image": f"images/{image.file_name}", "caption": caption(image)})
    (image_dir / "a_folder.jpg").mkdir()
    rows += [{"image": "images/missing.png", "caption": "missing"}, {"image": "images/a_folder.jpg", "caption": "dir"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return zoo_expected({"unreadable": 2})


def write_disk(path: Path) -> Expected:
    """A ``save_to_disk`` folder with an Image feature column plus one null image (-> empty)."""
    _image_feature_table(with_null=True).save_to_disk(str(path))
    return zoo_expected({"empty": 1})


def write_tar_shards(folder: Path, n_shards: int = 2) -> tuple[list[Path], Expected]:
    """Zoo samples dealt over ``n_shards`` tars (image + .txt + .json each), plus in the last shard a
    folder member named like an image (unreadable) and a sample with only a .txt (missing_image)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shard-{i:03d}.tar" for i in range(n_shards)]
    images = zoo()
    for shard, path in enumerate(paths):
        with tarfile.open(path, "w") as tar:
            for i, image in enumerate(images):
                if i % n_shards != shard:
                    continue
                key = f"s{shard}/{image.name}"
                _add_member(tar, f"{key}.{image.ext}", image.data)
                _add_member(tar, f"{key}.txt", caption(image).encode())
                _add_member(tar, f"{key}.json", json.dumps({"index": i}).encode())
            if shard == n_shards - 1:
                folder_member = tarfile.TarInfo(f"s{shard}/folder_named.jpg")
                folder_member.type = tarfile.DIRTYPE
                tar.addfile(folder_member)
                _add_member(tar, f"s{shard}/caption_only.txt", b"no image here")
    return paths, zoo_expected({"unreadable": 1, "missing_image": 1})


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_good_folder(root: Path, n: int, size: tuple[int, int] = (12, 10)) -> list[str]:
    """``n`` distinct good PNGs named ``img_000.png`` ...; returns the file names in sorted order."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img_{i:03d}.png"
        pixels = np.full((size[1], size[0], 3), i % 256, dtype=np.uint8)
        pixels[0, 0] = (i * 7 % 256, i * 13 % 256, 255 - i % 256)
        (root / name).write_bytes(encode(Image.fromarray(pixels), "PNG"))
        names.append(name)
    return names


def write_good_shards(folder: Path, counts: list[int], size: tuple[int, int] = (12, 10)) -> tuple[list[Path], list[str]]:
    """Tar shards holding ``counts[i]`` distinct good PNG samples each; returns paths and all keys."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, keys, i = [], [], 0
    for shard, count in enumerate(counts):
        path = folder / f"good-{shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                pixels = np.full((size[1], size[0], 3), i % 256, dtype=np.uint8)
                key = f"g{shard}/{i:04d}"
                _add_member(tar, f"{key}.png", encode(Image.fromarray(pixels), "PNG"))
                _add_member(tar, f"{key}.txt", f"sample {i}".encode())
                keys.append(key)
                i += 1
        paths.append(path)
    return paths, keys
