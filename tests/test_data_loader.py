"""ImageLoader: deterministic order, exact resume from state_dict, rank sharding, drop_last, epochs, CLI."""
import itertools
import json

import bad_images as zoo_files
import pytest
import torch
from bad_images import ZOO_MAX_PIXELS, ZOO_MIN_SIDE

from vilex.cli.main import main
from vilex.data import FolderSource, ImageLoader, TarShardSource, ViewConfig
from vilex.data import loader as loader_module
from vilex.errors import DataError

VIEWS = {"encoder": ViewConfig(size=8), "decoder": ViewConfig(size=4, fit="letterbox", mean=(0, 0, 0), std=(1, 1, 1))}


def _folder_loader(root, **kwargs) -> ImageLoader:
    settings = {"views": VIEWS, "batch_size": 4, "seed": 3, "epochs": 2, "max_pixels": ZOO_MAX_PIXELS,
                "min_side": ZOO_MIN_SIDE, **kwargs}
    return ImageLoader(FolderSource(root), **settings)


def _shard_loader(paths, **kwargs) -> ImageLoader:
    settings = {"views": VIEWS, "batch_size": 3, "seed": 5, "epochs": 2, **kwargs}
    return ImageLoader(TarShardSource([str(p) for p in paths]), **settings)


def _keys(batches) -> list[str]:
    """All sample keys of an iterable of batches, in order."""
    return [key for batch in batches for key in batch.keys]


def _assert_same_batches(left, right):
    assert [b.keys for b in left] == [b.keys for b in right]
    for a, b in zip(left, right):
        assert a.meta == b.meta
        for view in VIEWS:
            assert torch.equal(a.images[view], b.images[view])


@pytest.fixture
def folder_23(tmp_path):
    names = zoo_files.write_good_folder(tmp_path / "good", 23)
    return tmp_path / "good", names


@pytest.fixture
def zoo_folder(tmp_path):
    zoo_files.write_folder(tmp_path / "zoo")
    names = zoo_files.write_good_folder(tmp_path / "zoo" / "extra", 9)  # 11 + 9 good, 9 bad
    with open(tmp_path / "zoo" / "metadata.jsonl", "a") as fh:  # metadata.jsonl defines the samples
        fh.writelines(json.dumps({"file_name": f"extra/{n}"}) + "\n" for n in names)
    return tmp_path / "zoo"


@pytest.fixture
def shards(tmp_path):
    return zoo_files.write_good_shards(tmp_path / "shards", [5, 3, 6, 4])


# ----------------------------------------------------------------------------- order
def test_same_seed_same_order_other_seed_other_order(folder_23):
    root, names = folder_23
    batches = list(_folder_loader(root))
    first = [b.keys for b in batches]
    assert first == [b.keys for b in _folder_loader(root)]
    assert first != [b.keys for b in _folder_loader(root, seed=4)]
    epoch0, epoch1 = _keys(batches[:6]), _keys(batches[6:])
    assert [len(keys) for keys in first] == [4, 4, 4, 4, 4, 3] * 2
    assert sorted(epoch0) == sorted(epoch1) == names  # every sample once per epoch
    assert epoch0 != epoch1  # reshuffled per epoch
    assert _keys(_folder_loader(root, shuffle=False, epochs=1)) == names


def test_sharded_order_is_deterministic_and_per_epoch(shards):
    paths, keys = shards
    first = _keys(_shard_loader(paths))
    assert first == _keys(_shard_loader(paths))
    assert first != _keys(_shard_loader(paths, seed=6))
    assert sorted(first[:18]) == sorted(first[18:]) == sorted(keys) and first[:18] != first[18:]
    assert _keys(_shard_loader(paths, shuffle=False, epochs=1)) == keys


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("k", [0, 1, 5, 6, 7, 10])
def test_resume_map_source_is_exact(zoo_folder, k):
    """20 good + 9 bad images, batch 4, 2 epochs: 10 batches; k = 5 ends epoch 0, k = 10 is the end."""
    original = _folder_loader(zoo_folder)
    stream = iter(original)
    consumed = list(itertools.islice(stream, k))
    state = json.loads(json.dumps(original.state_dict()))  # must survive a JSON checkpoint
    rest = list(stream)
    assert len(consumed) + len(rest) == 10

    restored = _folder_loader(zoo_folder)
    restored.load_state_dict(state)
    _assert_same_batches(list(restored), rest)
    assert restored.summary() == original.summary()
    assert original.summary()["skipped"] == {"decompression_bomb": 4, "empty": 2, "not_an_image": 2,
                                             "too_small": 2, "truncated": 4, "unreadable": 4}  # 2 epochs


@pytest.mark.parametrize("k", [1, 2, 3, 6, 11])
def test_resume_sharded_source_is_exact_and_decodes_nothing_twice(shards, monkeypatch, k):
    """18 samples in shards of 5, 3, 6, 4, batch 3, 2 epochs = 12 batches; batches straddle shard edges."""
    paths, _ = shards
    original = _shard_loader(paths)
    stream = iter(original)
    list(itertools.islice(stream, k))
    state = original.state_dict()
    rest = list(stream)

    decoded = []
    real_decode = loader_module.decode_image
    monkeypatch.setattr(loader_module, "decode_image", lambda data, **kw: decoded.append(1) or real_decode(data, **kw))
    restored = _shard_loader(paths)
    restored.load_state_dict(state)
    resumed = list(restored)
    _assert_same_batches(resumed, rest)
    assert len(decoded) == 3 * (12 - k)  # only the remaining samples are decoded
    assert restored.summary() == original.summary()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_resume_with_bad_shards_counts_each_once(shards, tmp_path, k):
    """A garbage shard and a cut one (3 whole samples listed, then a broken header): resuming inside the
    cut shard must not count it again."""
    paths, _ = shards
    garbage, cut = tmp_path / "garbage.tar", tmp_path / "cut.tar"
    garbage.write_bytes(b"not a tar" * 100)
    cut.write_bytes(paths[0].read_bytes()[: 3 * 2048 + 100])  # a sample = png + txt = 2 x 1024 bytes
    loader_args = {"batch_size": 1, "shuffle": False, "epochs": 1}
    original = _shard_loader([garbage, cut, paths[1]], **loader_args)
    stream = iter(original)
    list(itertools.islice(stream, k))
    state = original.state_dict()
    rest = list(stream)
    restored = _shard_loader([garbage, cut, paths[1]], **loader_args)
    restored.load_state_dict(state)
    _assert_same_batches(list(restored), rest)
    assert restored.summary()["skipped"] == original.summary()["skipped"] == {"bad_shard": 2}
    assert original.summary()["samples"] == 3 + 3


def test_resume_into_a_shard_that_no_longer_lists_counts_it(shards):
    """Saved inside shard 0, then shard 0 becomes unreadable (a remote listing that now fails, a replaced file):
    its remaining samples are lost, so the resume counts one bad_shard rather than nothing."""
    paths, _ = shards
    loader_args = {"batch_size": 1, "shuffle": False, "epochs": 1}
    original = _shard_loader(paths[:2], **loader_args)
    list(itertools.islice(iter(original), 2))
    state = original.state_dict()
    paths[0].write_bytes(b"not a tar" * 100)
    restored = _shard_loader(paths[:2], **loader_args)
    restored.load_state_dict(state)
    rest = list(restored)
    assert len(rest) == 3 and restored.summary()["skipped"] == {"bad_shard": 1}


def test_state_for_another_setup_is_refused(folder_23):
    root, _ = folder_23
    state = _folder_loader(root).state_dict()
    other = _folder_loader(root, seed=4, rank=1, world_size=2)
    with pytest.raises(DataError, match=r"^loader state does not match this loader: seed 3 in the state, 4 here; "
                                        r"rank 0 in the state, 1 here; world_size 1 in the state, 2 here$"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="not an ImageLoader state"):
        other.load_state_dict({"epoch": 0})


# ----------------------------------------------------------------------------- ranks
def test_rank_shards_are_disjoint_and_complete(folder_23, shards):
    root, names = folder_23
    per_rank = [_keys(_folder_loader(root, rank=r, world_size=3, epochs=1)) for r in range(3)]
    assert [len(keys) for keys in per_rank] == [8, 8, 7]
    assert sorted(key for keys in per_rank for key in keys) == names

    paths, keys = shards
    per_rank = [_keys(_shard_loader(paths, rank=r, world_size=2, epochs=1)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(key for keys in per_rank for key in keys) == sorted(keys)
    with pytest.raises(DataError, match=r"\(4 shards\) has 4 shards, fewer than world_size 5"):
        _shard_loader(paths, world_size=5)


# ----------------------------------------------------------------------------- batches and epochs
def test_drop_last_is_counted(folder_23):
    root, _ = folder_23
    loader = _folder_loader(root, drop_last=True)
    assert [len(b) for b in loader] == [4] * 10
    summary = loader.summary()
    assert (summary["samples"], summary["batches"], summary["dropped_last"], summary["epochs_completed"]) == (40, 10, 6, 2)


def test_drop_last_with_too_few_samples_fails_clearly(tmp_path):
    zoo_files.write_good_folder(tmp_path / "three", 3)
    loader = ImageLoader(FolderSource(tmp_path / "three"), views={}, batch_size=4, drop_last=True)
    with pytest.raises(DataError, match="only 3 decodable samples, fewer than batch_size 4 with drop_last"):
        list(loader)


def test_endless_epochs_and_batch_contents(folder_23):
    root, _ = folder_23
    loader = _folder_loader(root, epochs=None, batch_size=5)
    batches = list(itertools.islice(loader, 12))  # 23 samples -> 5 batches per epoch
    assert loader.epoch == 2
    assert batches[0].images["encoder"].shape == (5, 3, 8, 8)
    assert batches[0].images["decoder"].shape == (5, 3, 4, 4)
    assert batches[0].meta[0] == {"file_name": batches[0].keys[0]}
    assert float(batches[0].images["decoder"].min()) >= 0 and float(batches[0].images["encoder"].min()) >= -1


def test_all_bad_zoo_rank_names_rank(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(4):
        (root / f"e{i}.png").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        list(ImageLoader(FolderSource(root), views={}, batch_size=1, rank=1, world_size=2))
    assert str(caught.value) == f"no decodable images in folder {root} (rank 1 of 2): 2 skipped (empty=2)"


# ----------------------------------------------------------------------------- CLI
def test_cli_inspect_prints_counts(tmp_path, capsys):
    zoo_files.write_folder(tmp_path / "zoo")
    code = main(["data", "inspect", "--source-type", "folder", "--path", str(tmp_path / "zoo"),
                 "--max-pixels", str(ZOO_MAX_PIXELS)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (report["samples"], report["decoded"], report["skipped_total"]) == (20, 11, 9)
    assert report["skipped"] == {"decompression_bomb": 2, "empty": 1, "not_an_image": 1, "too_small": 1,
                                 "truncated": 2, "unreadable": 2}
    assert report["modes"] == {"CMYK": 1, "I;16": 1, "L": 1, "LA": 1, "P": 2, "RGB": 4, "RGBA": 1}
    assert report["width"] == {"min": 8, "max": 16, "mean": 14.55}


def test_cli_inspect_all_bad_exits_2(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    assert main(["data", "inspect", "--path", str(tmp_path / "bad")]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] == {"empty": 1}
    assert captured.err.strip() == f"error: no decodable images in folder {tmp_path / 'bad'}: 1 skipped (empty=1)"
    assert main(["data", "inspect", "--source-type", "folderz", "--path", "x"]) == 2
    assert "unknown image source 'folderz'" in capsys.readouterr().err
