"""Every source type reads the bad-image zoo with exact skip counts; source errors are one clear line."""
import io
import json
import tarfile

import bad_images as zoo_files
import pytest
from bad_images import ZOO_MAX_PIXELS, ZOO_MIN_SIDE

from vilex.config import ConfigError, from_dict
from vilex.data import (
    DataConfig,
    FolderSource,
    HFDatasetSource,
    ImageLoader,
    TarShardSource,
    build_loader,
)
from vilex.data.sources import expand_braces
from vilex.errors import DataError

VIEWS = {"encoder": {"size": 16}, "decoder": {"size": 8, "fit": "letterbox"}}


def _write(kind: str, tmp_path):
    """(DataConfig fields, Expected) for the zoo written as ``kind``."""
    if kind == "folder":
        return {"type": "folder", "path": str(tmp_path / "imgs")}, zoo_files.write_folder(tmp_path / "imgs")
    if kind == "parquet_image_feature":
        path = tmp_path / "zoo.parquet"
        return {"type": "hf", "path": str(path)}, zoo_files.write_parquet_image_feature(path)
    if kind == "parquet_bytes":
        path = tmp_path / "raw.parquet"
        return {"type": "hf", "path": str(path), "image_column": "jpg"}, zoo_files.write_parquet_bytes(path, "jpg")
    if kind == "json_paths":
        path = tmp_path / "meta" / "zoo.jsonl"
        return {"type": "hf", "path": str(path)}, zoo_files.write_json_paths(path)
    if kind == "save_to_disk":
        return {"type": "hf", "path": str(tmp_path / "saved")}, zoo_files.write_disk(tmp_path / "saved")
    if kind == "webdataset":
        _, expected = zoo_files.write_tar_shards(tmp_path / "tars", n_shards=3)
        return {"type": "webdataset", "path": str(tmp_path / "tars" / "shard-{000..002}.tar")}, expected
    raise AssertionError(kind)


SOURCE_KINDS = ["folder", "parquet_image_feature", "parquet_bytes", "json_paths", "save_to_disk", "webdataset"]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_zoo_through_every_source(kind, tmp_path):
    fields, expected = _write(kind, tmp_path)
    cfg = from_dict(DataConfig, {**fields, "views": VIEWS, "batch_size": 4, "shuffle": False,
                                 "max_pixels": ZOO_MAX_PIXELS, "min_side": ZOO_MIN_SIDE})
    loader = build_loader(cfg)
    batches = list(loader)
    summary = loader.summary()

    assert [len(b) for b in batches] == [4, 4, 3]  # 11 good images, batches refilled past every bad one
    assert summary["samples"] == expected.good == 11
    assert summary["skipped"] == expected.skips
    assert summary["skipped_total"] == expected.total_skipped
    assert batches[0].images["encoder"].shape == (4, 3, 16, 16)
    assert batches[0].images["decoder"].shape == (4, 3, 8, 8)
    assert all(float(b.images["encoder"].min()) >= -1 and float(b.images["encoder"].max()) <= 1 for b in batches)


def test_exact_zoo_counts_per_source(tmp_path):
    """The numbers the parametrized test compares against, written out once."""
    assert zoo_files.write_folder(tmp_path / "f").skips == {
        "decompression_bomb": 2, "empty": 1, "not_an_image": 1, "too_small": 1, "truncated": 2, "unreadable": 2}
    assert zoo_files.write_parquet_image_feature(tmp_path / "p.parquet").skips == {
        "decompression_bomb": 2, "empty": 2, "not_an_image": 1, "too_small": 1, "truncated": 2}
    assert zoo_files.write_tar_shards(tmp_path / "t")[1].skips == {
        "decompression_bomb": 2, "empty": 1, "missing_image": 1, "not_an_image": 1, "too_small": 1,
        "truncated": 2, "unreadable": 1}


def _good_batches(source):
    loader = ImageLoader(source, views={}, batch_size=100, shuffle=False, max_pixels=ZOO_MAX_PIXELS,
                         min_side=ZOO_MIN_SIDE)
    return [sample for batch in loader for sample in zip(batch.keys, batch.meta)]


def test_metadata_travels_with_samples(tmp_path):
    zoo_files.write_folder(tmp_path / "imgs")
    folder = dict(_good_batches(FolderSource(tmp_path / "imgs")))
    assert folder["sub/grey_L.png"] == {"file_name": "sub/grey_L.png", "caption": "a picture called grey_L"}
    assert folder["rgb.jpg"]["caption"] == "a picture called rgb"

    zoo_files.write_json_paths(tmp_path / "j" / "zoo.jsonl")
    rows = dict(_good_batches(HFDatasetSource([tmp_path / "j" / "zoo.jsonl"])))
    assert rows["zoo.jsonl[1]"] == {"caption": "a picture called grey_L"}

    zoo_files.write_tar_shards(tmp_path / "tars", n_shards=2)
    samples = dict(_good_batches(TarShardSource([str(tmp_path / "tars" / "shard-*.tar")])))
    assert samples["s1/grey_L"] == {"txt": "a picture called grey_L", "index": 1}


def test_folder_listing_is_sorted_and_recursive(tmp_path):
    names = zoo_files.write_good_folder(tmp_path / "a", 3)
    zoo_files.write_good_folder(tmp_path / "a" / "deeper" / "b", 2)
    (tmp_path / "a" / "UPPER.PNG").write_bytes((tmp_path / "a" / names[0]).read_bytes())
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    source = FolderSource(tmp_path / "a")
    assert source.files == ["UPPER.PNG", "deeper/b/img_000.png", "deeper/b/img_001.png", *names]


def test_all_bad_source_names_source_and_counts(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(3):
        (root / f"empty{i}.jpg").write_bytes(b"")
    truncated = next(image for image in zoo_files.zoo() if image.name == "truncated_png").data
    for i in range(2):
        (root / f"cut{i}.png").write_bytes(truncated)
    loader = ImageLoader(FolderSource(root), views={}, batch_size=2)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert str(caught.value) == f"no decodable images in folder {root}: 5 skipped (empty=3, truncated=2)"


def test_bad_shard_is_counted_once(tmp_path):
    paths, keys = zoo_files.write_good_shards(tmp_path, [3, 2])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive" * 40)
    cut = tmp_path / "cut.tar"
    # Each sample is png + txt = 2 x (512 header + 512 data) bytes: a cut at 2500 keeps sample 1 whole and
    # ends inside sample 2's header, which tarfile alone would take for a normal end of the archive.
    cut.write_bytes(paths[0].read_bytes()[:2500])
    source = TarShardSource([str(paths[0]), str(paths[1]), str(tmp_path / "garbage.tar"), str(cut)])
    loader = ImageLoader(source, views={}, batch_size=4, shuffle=False)
    assert [b.keys for b in loader] == [keys[:4], [keys[4], keys[0]]]
    assert loader.summary()["skipped"] == {"bad_shard": 2}


def test_brace_and_glob_expansion(tmp_path):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    paths, _ = zoo_files.write_good_shards(tmp_path, [1, 1, 1])
    assert TarShardSource([str(tmp_path / "good-*.tar")]).shards == [str(p) for p in paths]
    with pytest.raises(DataError, match=r"webdataset source: file not found: .*good-003\.tar"):
        TarShardSource([str(tmp_path / "good-{000..003}.tar")])


def test_source_errors_are_one_clear_line(tmp_path):
    with pytest.raises(DataError, match=f"image folder not found: {tmp_path / 'nope'}$"):
        FolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found in folder .*empty \(extensions: \.jpg"):
        FolderSource(tmp_path / "empty")
    zoo_files.write_good_folder(tmp_path / "meta", 2)
    (tmp_path / "meta" / "metadata.jsonl").write_text('{"file_name": "img_000.png"}\n{not json}\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: invalid JSON"):
        FolderSource(tmp_path / "meta")
    zoo_files.write_parquet_bytes(tmp_path / "raw.parquet", "jpg")
    with pytest.raises(DataError, match=r"raw\.parquet: no image column 'image'; columns: jpg, caption"):
        HFDatasetSource([tmp_path / "raw.parquet"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot tell the format of .*data.csv; set hf_format"):
        HFDatasetSource([tmp_path / "data.csv"])
    with pytest.raises(DataError, match="data.path is empty: set the folder source's path"):
        build_loader(DataConfig())


def test_metadata_rows_for_missing_files_are_counted(tmp_path):
    zoo_files.write_good_folder(tmp_path / "m", 2)
    rows = [{"file_name": "img_000.png", "caption": "x"}, {"file_name": "gone.png", "caption": "y"}]
    (tmp_path / "m" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loader = ImageLoader(FolderSource(tmp_path / "m"), views={}, batch_size=8, shuffle=False)
    # metadata.jsonl defines the samples: img_001.png (not named) is not one; gone.png is counted
    assert [b.keys for b in loader] == [["img_000.png"]]
    assert loader.summary()["skipped"] == {"unreadable": 1}


def test_data_config_checks_type_and_views():
    cfg = from_dict(DataConfig, {"type": "webdataset", "path": ["a.tar", "b.tar"],
                                 "views": {"encoder": {"size": 32}, "decoder": {"size": 16, "mean": [0, 0, 0]}}})
    assert cfg.paths == ["a.tar", "b.tar"]
    assert (cfg.views["encoder"].size, cfg.views["decoder"].mean, cfg.views["decoder"].fit) == (32, (0.0, 0.0, 0.0), "crop")
    with pytest.raises(ConfigError, match="type: unknown image source 'folders'; registered: folder, hf, webdataset"):
        from_dict(DataConfig, {"type": "folders"})
    with pytest.raises(ConfigError, match=r"views.encoder.pad_color: must be <= 255, got 300"):
        from_dict(DataConfig, {"views": {"encoder": {"pad_color": [300, 0, 0]}}})
    with pytest.raises(ConfigError, match=r"views.encoder.fit: must be one of 'crop', 'letterbox'"):
        from_dict(DataConfig, {"views": {"encoder": {"fit": "pad"}}})


def test_truncated_tar_member_data(tmp_path):
    """A tar whose last image member is cut short: the sample is 'truncated', the shard 'bad_shard'."""
    path = tmp_path / "one.tar"
    image = zoo_files.encode(zoo_files.noise_rgb(), "PNG")
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("k0.png")
        info.size = len(image)
        tar.addfile(info, io.BytesIO(image))
    path.write_bytes(path.read_bytes()[: 512 + len(image) // 2])
    loader = ImageLoader(TarShardSource([str(path)]), views={}, batch_size=1)
    with pytest.raises(DataError, match=r"no decodable images in webdataset .*: 2 skipped \(bad_shard=1, truncated=1\)"):
        list(loader)
