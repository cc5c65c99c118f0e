"""The latent cache built by every process, per shard: the share split and its bit-identical latents (in one process and
under a real 2-process launch), a killed build resumed, changed data re-encoded unit by unit, damaged sidecars found
and rebuilt, the bounded wait for other processes, and training that never decodes the decoder view."""
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from pretrain_helpers import REPO, TINY_CONFIG, build_tiny_world, env, run_cli

from vilex.config import load_config
from vilex.errors import UserError
from vilex.train import latent_cache as lc
from vilex.train.config import PretrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SHARDS = 4
SHARD_PATTERN = "part-{000..003}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD decoder, the 19 toy training images as a folder, and the same images dealt over 4 tar shards (shard 2
    also holds a sample that does not decode)."""
    root = build_tiny_world(tmp_path_factory.mktemp("precompute"), n=24)
    images = sorted((root / "data" / "train" / "images").glob("*.png"))
    (root / "shards").mkdir()
    for s in range(SHARDS):
        with tarfile.open(root / "shards" / f"part-{s:03d}.tar", "w") as tar:
            for i, image in enumerate(images):
                if i % SHARDS == s:
                    _add(tar, f"{image.stem}.png", image.read_bytes())
                if s == 2 and i == 4:
                    _add(tar, "broken.png", b"not an image at all")
    return root


def _sets(world: Path, cache: Path, source: str, *extra: str, shards: Path | None = None) -> list[str]:
    data = ([f"data.train.path={world / 'data' / 'train'}"] if source == "folder" else
            ["data.train.type=webdataset", f"data.train.path={(shards or world / 'shards') / SHARD_PATTERN}"])
    return [f"model.decoder.name_or_path={world / 'decoder'}", "model.decoder.type=stable_diffusion", *data,
            f"latent_cache.dir={cache}", "latent_cache.chunk_rows=8", "log.tensorboard=false", "val.every=1000",
            *extra]  # chunks of 8: the 19 toy images make 3 units of a folder, like the 4 shards


def _cfg(world: Path, tmp: Path, source: str, *extra: str, shards: Path | None = None):
    sets = _sets(world, tmp / "cache", source, f"train.output_dir={tmp / 'run'}", *extra, shards=shards)
    return load_config(PretrainConfig, TINY_CONFIG, sets)


@pytest.fixture(scope="module")
def model(world, tmp_path_factory):
    from vilex.models import ViLexModel
    from vilex.train.data import model_views

    cfg = _cfg(world, tmp_path_factory.mktemp("model"), "folder")
    built = ViLexModel.from_config(cfg.model)
    return built, model_views(built, cfg.data.train)["decoder"]


def _build(cfg, model, **kwargs) -> lc.LatentCache:
    return lc.LatentCache.open_or_build(cfg.latent_cache, model[0].decoder, cfg.data.train, model[1], **kwargs)


def _folder(cache_root: Path) -> Path:
    [folder] = [p for p in cache_root.iterdir() if p.is_dir()]
    return folder


def _contents(folder: Path) -> dict:
    """Every unit: its tensors' bytes, its header metadata and its marker's text."""
    from safetensors import safe_open

    out = {}
    for sidecar in sorted(folder.glob("*.safetensors")):
        with safe_open(str(sidecar), framework="pt") as f:
            tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
            out[sidecar.name] = (tensors, f.metadata(), sidecar.with_name(sidecar.stem + ".done.json").read_text())
    return out


@pytest.fixture(scope="module")
def reference(world, model, tmp_path_factory):
    """The cache of each source built by one process (no interruption)."""
    built = {}
    for source in ("sharded", "folder"):
        cache = _build(_cfg(world, tmp_path_factory.mktemp(f"reference_{source}"), source), model)
        built[source] = (cache.folder.name, _contents(cache.folder))
    return built


def _spy_encodes(monkeypatch) -> list[str]:
    encoded: list[str] = []
    real = lc._encode_unit

    def spy(folder, layout, unit, *args, **kwargs):
        encoded.append(unit.name)
        return real(folder, layout, unit, *args, **kwargs)

    monkeypatch.setattr(lc, "_encode_unit", spy)
    return encoded


# ----------------------------------------------------------------------------- the share of each process
@pytest.mark.parametrize("source", ["sharded", "folder"])
def test_each_process_encodes_its_share_and_the_latents_are_those_of_one_process(world, model, reference, tmp_path,
                                                                                  monkeypatch, source):
    from vilex.data import build_source

    cfg = _cfg(world, tmp_path, source)
    layout = lc.layout_for(build_source(cfg.data.train), cfg.latent_cache.chunk_rows)
    key, _ = lc.cache_key(model[0].decoder, cfg.data.train, model[1], layout, cfg.latent_cache.dtype)
    folder = tmp_path / "cache" / key
    folder.mkdir(parents=True)
    encoded = _spy_encodes(monkeypatch)
    shares = []
    for rank in (0, 1):
        before = len(encoded)
        report = lc.build_share(folder, layout, model[0].decoder, model[1], cfg.data.train, "float32", rank, 2)
        shares.append(set(encoded[before:]))
        assert report["encoded"] == report["units"] == len(shares[-1])
    names = {layout.unit(u).name for u in range(layout.count)}
    assert shares[0] | shares[1] == names and not shares[0] & shares[1]  # disjoint and complete
    assert shares[0] == {layout.unit(u).name for u in range(0, layout.count, 2)}  # unit u -> rank u % world
    assert key == reference[source][0] and _contents(folder) == reference[source][1]  # bit for bit


def test_decode_workers_give_the_same_latents(world, model, reference, tmp_path):
    cache = _build(_cfg(world, tmp_path, "sharded", "data.train.num_workers=1"), model)
    assert _contents(cache.folder) == reference["sharded"][1]


def _cache_latents(world: Path, cache: Path, source: str, nproc: int = 1, extra_env: dict | None = None):
    args = ["cache-latents", "--config", str(TINY_CONFIG), "--device", "cpu"]
    for item in _sets(world, cache, source):
        args += ["--set", item]
    if extra_env is None:
        return run_cli(args, nproc=nproc)
    return subprocess.run([sys.executable, "-m", "vilex", *args], env={**env(), **extra_env}, capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("source", ["sharded", pytest.param("folder", marks=pytest.mark.slow)])
def test_a_two_process_launch_gives_the_latents_of_one_process(world, reference, tmp_path, source):
    import json

    two = _cache_latents(world, tmp_path / "two", source, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout)
    assert report["entries"] == 19 and report["encoded_units"] == report["units"] == (4 if source == "sharded" else 3)
    assert report["skipped"] == ({"not_an_image": 1} if source == "sharded" else {})
    folder = _folder(tmp_path / "two")
    assert folder.name == reference[source][0]
    assert _contents(folder) == reference[source][1]
    assert not any((folder / "progress").iterdir())  # the launch's reports are cleaned up


# ----------------------------------------------------------------------------- resume
def test_a_killed_precompute_resumes_encoding_only_the_unfinished_units(world, model, reference, tmp_path, monkeypatch):
    killed = _cache_latents(world, tmp_path / "cache", "sharded", extra_env={lc.KILL_AFTER_UNITS_ENV: "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = _folder(tmp_path / "cache")
    first, last = (lc.shard_unit_name(str(world / "shards" / f"part-{s:03d}.tar")) for s in (0, SHARDS - 1))
    assert [p.name for p in folder.glob("*.done.json")] == [f"{first}.done.json"]  # one of 4 units finished
    (folder / f"{last}.safetensors").write_bytes(b"cut short")  # as if a kill had hit a sidecar before its marker

    encoded = _spy_encodes(monkeypatch)
    cache = _build(_cfg(world, tmp_path, "sharded"), model)
    assert cache.report.encoded == SHARDS - 1 and len(encoded) == SHARDS - 1 and first not in encoded
    assert _contents(folder) == reference["sharded"][1]  # the same latents as an uninterrupted build
    assert _build(_cfg(world, tmp_path, "sharded"), model).report.encoded == 0  # complete now


def test_a_unit_without_its_marker_is_encoded_again_alone(world, model, reference, tmp_path, monkeypatch):
    cfg = _cfg(world, tmp_path, "folder")
    folder = _build(cfg, model).folder
    (folder / "chunk-000001.done.json").unlink()
    encoded = _spy_encodes(monkeypatch)
    assert _build(cfg, model).report.encoded == 1 and encoded == ["chunk-000001"]
    assert _contents(folder) == reference["folder"][1]


def test_a_changed_or_added_shard_is_encoded_alone_in_the_same_folder(world, model, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shutil.copytree(world / "shards", shards)
    cfg = _cfg(world, tmp_path, "sharded", shards=shards)
    folder = _build(cfg, model).folder
    encoded = _spy_encodes(monkeypatch)
    os.utime(shards / "part-001.tar", ns=(1, 1))
    assert _build(cfg, model).folder == folder and encoded == [lc.shard_unit_name(str(shards / "part-001.tar"))]
    shutil.copy(shards / "part-000.tar", shards / "part-004.tar")
    grown = _cfg(world, tmp_path, "sharded", f"data.train.path={shards / 'part-{000..004}.tar'}")
    cache = _build(grown, model)
    assert cache.folder == folder and encoded[1:] == [lc.shard_unit_name(str(shards / "part-004.tar"))]
    assert len(cache) == 19 + 5


# ----------------------------------------------------------------------------- verified, never trusted
@pytest.mark.parametrize("damage", ["changed_bytes", "truncated", "marker_garbled"])
def test_a_damaged_sidecar_is_found_and_rebuilt(world, model, reference, tmp_path, monkeypatch, caplog, damage):
    from vilex.data import ImageLoader, build_source

    cfg = _cfg(world, tmp_path, "sharded")
    folder = _build(cfg, model).folder
    unit = lc.shard_unit_name(str(world / "shards" / "part-002.tar"))
    sidecar = folder / f"{unit}.safetensors"
    data = bytearray(sidecar.read_bytes())
    if damage == "changed_bytes":  # same size: only the content hash can tell, at the first read
        data[-64:] = bytes(64)
        sidecar.write_bytes(bytes(data))
        source = build_source(cfg.data.train)
        batch = next(iter(ImageLoader(source, views={}, batch_size=19, shuffle=False)))
        with pytest.raises(lc.CorruptCacheError, match=f"{unit}.safetensors has changed bytes.*rebuilt"):
            lc.LatentCache(folder, lc.layout_for(source, 8)).posterior(batch.keys, batch.locations)
        assert (folder / f"{unit}.corrupt").is_file() and not (folder / f"{unit}.done.json").exists()
    elif damage == "truncated":
        sidecar.write_bytes(bytes(data[: len(data) // 2]))
    else:
        (folder / f"{unit}.done.json").write_text("{not json")
    encoded = _spy_encodes(monkeypatch)
    with caplog.at_level("WARNING", logger="vilex.train.latent_cache"):
        rebuilt = _build(cfg, model)
    assert encoded == [unit] and rebuilt.report.encoded == 1
    assert f"{unit} is broken" in caplog.text and "rebuilding" in caplog.text
    assert not (folder / f"{unit}.corrupt").exists()
    assert _contents(folder) == reference["sharded"][1]


def test_non_finite_latents_stop_the_read_and_mark_the_unit(world, model, tmp_path):
    from vilex.data import ImageLoader, build_source
    from vilex.train.latent_sidecars import write_unit

    cfg = _cfg(world, tmp_path, "folder")
    cache = _build(cfg, model)
    layout = cache.layout
    unit = layout.unit(0)
    keys = [layout.source.key(i) for i in range(8)]
    nan = torch.full((8, 4, 2, 2), float("nan"))
    # a sidecar true to its marker, holding NaN
    write_unit(cache.folder, unit, layout.fingerprint(0), nan, nan.clone(), keys, {}, None)
    batch = next(iter(ImageLoader(build_source(cfg.data.train), views={}, batch_size=2, shuffle=False)))
    with pytest.raises(lc.CorruptCacheError, match="non-finite latents in chunk-000000"):
        lc.LatentCache(cache.folder, layout).posterior(batch.keys, batch.locations)
    assert (cache.folder / "chunk-000000.corrupt").is_file()


def test_a_sample_the_cache_does_not_hold_is_a_clear_error(world, model, tmp_path):
    cache = _build(_cfg(world, tmp_path, "sharded"), model)
    with pytest.raises(UserError, match="has no entry for sample 'broken': the data changed"):
        cache.posterior(["broken"], [(2, 1)])  # listed in shard 2, but it does not decode
    with pytest.raises(UserError, match="has no entry for sample 'elsewhere'"):
        cache.posterior(["elsewhere"], [(7, 0)])


# ----------------------------------------------------------------------------- waiting for the other processes
def test_the_wait_for_other_processes_is_bounded_and_names_them(tmp_path):
    mine = {"rank": 0, "units": 1, "encoded": 1, "entries": 5, "skipped": {}}
    with pytest.raises(UserError, match=r"process\(es\) 1, 2 did not finish their share .* within 0.001 min "
                                        r"\(latent_cache.wait_timeout_min\)"):
        lc._gather(tmp_path, "launch-a", 0, 3, mine, minutes=0.001)
    for rank in (1, 2):  # the others of another launch have reported
        (tmp_path / "progress" / "launch-b").mkdir(parents=True, exist_ok=True)
        (tmp_path / "progress" / "launch-b" / f"rank-{rank:05d}.json").write_text(f'{{"rank": {rank}}}')
    reports = lc._gather(tmp_path, "launch-b", 0, 3, mine, minutes=0.01)
    assert [r["rank"] for r in reports] == [0, 1, 2]
    assert not (tmp_path / "progress" / "launch-b").exists()  # rank 0 removes the launch's reports


def test_wait_timeout_defaults_to_the_collective_timeout(monkeypatch):
    from vilex.train.config import LatentCacheConfig

    monkeypatch.setenv("VILEX_COLLECTIVE_TIMEOUT_MIN", "7")
    assert lc.wait_minutes(LatentCacheConfig()) == 7.0
    assert lc.wait_minutes(LatentCacheConfig(wait_timeout_min=2.5)) == 2.5


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("workers", [0, 1])
def test_batches_say_where_each_sample_lives(world, workers):
    from vilex.data import ImageLoader, TarShardSource

    source = TarShardSource([str(world / "shards" / SHARD_PATTERN)])
    with ImageLoader(source, views={}, batch_size=5, seed=3, num_workers=workers) as loader:
        seen = [(key, loc) for batch in loader for key, loc in zip(batch.keys, batch.locations)]
    assert len(seen) == 19
    for key, (shard, position) in seen:
        with source.open_shard(shard) as reader:
            assert reader.keys[position] == key


def test_training_with_the_cache_never_decodes_the_decoder_view(world, tmp_path, monkeypatch):
    import vilex.data.loader as loader_module
    from vilex.train.loop import Pretrainer

    rendered: list[int] = []
    real_render = loader_module.render_view
    monkeypatch.setattr(loader_module, "render_view", lambda image, view: (rendered.append(id(view)),
                                                                           real_render(image, view))[1])
    losses = {}
    for cached in ("true", "false"):
        cfg = _cfg(world, tmp_path / cached, "sharded", "train.max_steps=3", "train.checkpoint_every=1000",
                   "model.taildrop.prob=0", f"latent_cache.enabled={cached}", f"latent_cache.dir={tmp_path / 'cache'}")
        trainer = Pretrainer(cfg)
        trainer.setup()
        rendered.clear()
        summary = trainer.run()
        losses[cached] = summary["losses"]
        if cached == "true":
            assert set(trainer.loader.views) == {"encoder"}
            assert set(rendered) == {id(trainer.loader.views["encoder"])}  # one view rendered per sample, no other
            assert len(rendered) == summary["images_seen"] == 12
            assert trainer.cache.hits == 12 and len(trainer.cache._open) <= lc.OPEN_SHARDS
        else:
            assert len(rendered) == 2 * 12  # without the cache, both views
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
