"""An img2dataset output folder is a webdataset source as it is: the folder, a brace pattern or a glob of its
``.tar`` files; the ``.parquet`` and ``_stats.json`` beside them are not shards; each sample's caption arrives as
``meta["txt"]`` and its ``.json`` fields are merged into the metadata; ``vilex data inspect`` sums the stats."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vilex.cli.main import main
from vilex.config import from_dict
from vilex.data import DataConfig, ImageLoader, TarShardSource, ViewConfig, decode_image
from vilex.data.loader import build_loader
from vilex.data.views import render_view
from vilex.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD_SAMPLES = [4, 3]  # successes per shard
FAILED = [(1, 0), (0, 2)]  # (failed_to_download, failed_to_resize) per shard: in the stats, not in the tars


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """As webdataset's TarWriter (which img2dataset uses) writes a member: read-only, user and group 'bigdata'."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 1_700_000_000, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_folder(folder) -> dict[str, dict]:
    """``00000.tar`` / ``00000.parquet`` / ``00000_stats.json`` ... as img2dataset writes them (members of a sample
    in sorted extension order: jpg, json, txt); returns key -> {jpg, caption, json} of every sample."""
    folder.mkdir(parents=True)
    samples: dict[str, dict] = {}
    for shard, count in enumerate(SHARD_SAMPLES):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for index in range(count):
                key = f"{shard:05d}{index:04d}"
                jpg = _jpeg(shard * 100 + index, (24 + index, 20))
                caption = f"a photo number {index} of shard {shard}"
                meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                        "error_message": None, "width": 24 + index, "height": 20, "original_width": 480,
                        "original_height": 400, "exif": json.dumps({"Image Make": "Camera"}),
                        "sha256": hashlib.sha256(jpg).hexdigest()}
                _member(tar, f"{key}.jpg", jpg)
                _member(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
                _member(tar, f"{key}.txt", caption.encode())
                samples[key] = {"jpg": jpg, "caption": caption, "json": meta}
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1" + bytes(64) + b"PAR1")  # not a shard; never opened
        download, resize = FAILED[shard]
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": count + download + resize, "successes": count, "failed_to_download": download,
            "failed_to_resize": resize, "duration": 1.5, "status_dict": {"success": count}}, indent=4))
    return samples


@pytest.fixture
def cc(tmp_path):
    folder = tmp_path / "cc12m"
    return folder, write_img2dataset_folder(folder)


@pytest.mark.parametrize("form", ["folder", "braces", "glob"])
def test_every_path_form_reads_the_tars_and_only_them(cc, form):
    folder, samples = cc
    path = {"folder": str(folder), "braces": f"{folder}/{{00000..00001}}.tar", "glob": f"{folder}/*.tar"}[form]
    source = TarShardSource([path])
    assert source.shards == [str(folder / "00000.tar"), str(folder / "00001.tar")]
    cfg = from_dict(DataConfig, {"type": "webdataset", "path": path, "views": {"encoder": {"size": 8}},
                                 "batch_size": 3, "shuffle": False})
    loader = build_loader(cfg)
    batches = list(loader)
    assert [key for batch in batches for key in batch.keys] == sorted(samples)
    assert loader.summary()["skipped_total"] == 0


def test_caption_json_fields_and_image_bytes_arrive_as_written(cc):
    folder, samples = cc
    source = TarShardSource([str(folder)])
    with source.open_shard(1) as reader:
        assert reader.error is None and reader.keys == ["000010000", "000010001", "000010002"]
        raw = reader.read(2)
    expected = samples["000010002"]
    assert raw.data == expected["jpg"]
    assert raw.meta == {"txt": expected["caption"], **expected["json"]}
    assert raw.meta["width"] == 26 and raw.meta["error_message"] is None

    view = ViewConfig(size=16, mean=(0, 0, 0), std=(1, 1, 1))
    batch = next(iter(ImageLoader(source, views={"image": view}, batch_size=7, shuffle=False)))
    assert batch.meta[6] == raw.meta
    assert batch.images["image"].shape == (7, 3, 16, 16)
    assert torch.equal(batch.images["image"][6], render_view(decode_image(expected["jpg"]), view))


def test_a_folder_without_tars_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError) as caught:
        TarShardSource([str(tmp_path / "empty")])
    assert str(caught.value) == f"webdataset source: no *.tar files in the folder {tmp_path / 'empty'}"


def test_inspect_shows_the_img2dataset_stats(cc, capsys):
    folder, samples = cc
    assert main(["data", "inspect", "--source-type", "webdataset", "--path", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["samples"], report["decoded"]) == (len(samples), len(samples))
    assert report["img2dataset"] == {"stats_files": 2, "count": 10, "successes": 7, "failed_to_download": 1,
                                     "failed_to_resize": 2}
