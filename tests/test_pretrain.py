"""Stage-1 training: the tiny config learns, the latent cache hits/misses/invalidates, the NaN guard, the
shipped real-scale configs (built on the meta device), and config errors through the real CLI."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import REPO, TINY_CONFIG, build_tiny_world, overrides

from vilex.config import load_config
from vilex.train.batching import plan_batches
from vilex.train.config import PretrainConfig
from vilex.train.loop import NonFiniteLossError, Pretrainer


@pytest.fixture(scope="module")
def sd_world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("sd_world"), n=24)


@pytest.fixture(scope="module")
def pixel_world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("pixel_world"), decoder="pixel_unet", n=24)


def _cfg(world, out, *extra, decoder="stable_diffusion"):
    return load_config(PretrainConfig, TINY_CONFIG, overrides(world, out, "val.every=1000", *extra, decoder=decoder))


def _fixed_loss(trainer, images):
    """Mean loss over fixed seeds on fixed images, all tokens (no TailDrop): a noise-free training signal."""
    pixels = (images - 0.5) / 0.5
    trainer.encoder.eval()
    with torch.no_grad():
        tokens = trainer.encoder(pixels)
        losses = [trainer.model.loss_from_tokens(tokens, pixels, generator=torch.Generator().manual_seed(s))["loss"]
                  for s in range(8)]
    trainer.encoder.train()
    return float(torch.stack(losses).mean())


def test_tiny_config_trains_loss_goes_down(pixel_world, tmp_path):
    from vilex.train.validation import validation_images

    cfg = _cfg(pixel_world, tmp_path, "train.max_steps=30", "train.checkpoint_every=1000", "model.taildrop.prob=0",
               "train.optim.lr_pooler=3e-3", "train.optim.lr_vit=1e-3", "train.optim.warmup_steps=0",
               "val.num_images=8", decoder="pixel_unet")
    trainer = Pretrainer(cfg)
    trainer.setup()
    images = validation_images(cfg, 16)
    before = _fixed_loss(trainer, images)
    summary = trainer.run()
    after = _fixed_loss(trainer, images)
    assert summary["steps"] == 30 and len(summary["losses"]) == 30
    assert after < 0.99 * before, (before, after)
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "pipeline" / "vit" / "config.json").is_file()  # each checkpoint holds a loadable pipeline
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 30


def test_math_attention_backend_changes_the_kernel_not_the_step(sd_world, tmp_path):
    """train.attention_backend=math: the step's SDPA calls use the unfused kernels, with the same loss as auto."""
    seen = {}
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if out.grad_fn is not None:
            seen.setdefault(backend, set()).add(type(out.grad_fn).__name__)
        return out

    losses = {}
    for backend in ("auto", "math"):
        trainer = Pretrainer(_cfg(sd_world, tmp_path / backend, "train.max_steps=1", "latent_cache.enabled=false",
                                  "model.taildrop.prob=0", f"train.attention_backend={backend}"))
        trainer.setup()
        batch = next(iter(trainer.loader))
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            trainer.generator.manual_seed(0)
            losses[backend] = float(trainer.micro_step(batch).detach())
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
    assert any("Flash" in name for name in seen["auto"])  # torch's fused CPU kernel by default
    assert seen["math"] and not any("Flash" in name or "Efficient" in name for name in seen["math"])
    assert losses["math"] == pytest.approx(losses["auto"], rel=1e-4)


def test_latent_cache_hit_miss_and_invalidation(sd_world, tmp_path, monkeypatch):
    import os

    from vilex.models import ViLexModel
    from vilex.train import latent_cache as lc
    from vilex.train.data import model_views

    cfg = _cfg(sd_world, tmp_path, "latent_cache.chunk_rows=8")  # 19 images: 3 units
    model = ViLexModel.from_config(cfg.model)
    view = model_views(model, cfg.data.train)["decoder"]
    encoded = []  # (cache folder, unit) of every unit encoded
    real_encode = lc._encode_unit
    monkeypatch.setattr(lc, "_encode_unit", lambda folder, layout, unit, *a, **k: (
        encoded.append((folder.name, unit.name)), real_encode(folder, layout, unit, *a, **k))[1])

    def build(v=view):
        return lc.LatentCache.open_or_build(cfg.latent_cache, model.decoder, cfg.data.train, v)

    first = build()
    again = build()
    assert len(encoded) == 3 and again.folder == first.folder and again.report.encoded == 0  # hit
    assert len(first) == 19  # the toy train split of 24 scenes

    # the cached posterior is the VAE's posterior of the same view of the image
    from vilex.data import ImageLoader, build_source

    batch = next(iter(ImageLoader(build_source(cfg.data.train), views={"d": view}, batch_size=3, shuffle=True)))
    mean, std = first.posterior(batch.keys, batch.locations)
    ref_mean, ref_std = model.decoder.encode_posterior(batch.images["d"])
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std, ref_std)
    # sampling from the cache == the decoder's own sampling for the same generator state
    x_cache = first.sample(batch.keys, batch.locations, model.decoder, torch.Generator().manual_seed(3))
    x_direct = model.decoder.to_model_space(batch.images["d"], torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_cache, x_direct)

    # another resolution/transform -> another cache
    assert build(dataclasses.replace(view, fit="letterbox")).folder != first.folder and len(encoded) == 6
    # another VAE (one weight changed) -> another cache
    with torch.no_grad():
        next(model.decoder.vae.parameters()).add_(1e-3)
    changed_vae = build()
    assert len(encoded) == 9 and len({folder for folder, _ in encoded}) == 3
    # changed data (an image rewritten) -> the unit holding it is encoded again, alone
    img = sorted((Path(cfg.data.train.path) / "images").glob("*.png"))[0]
    img.write_bytes(img.read_bytes())
    os.utime(img, ns=(1, 1))
    assert build().folder == changed_vae.folder and encoded[9:] == [(changed_vae.folder.name, "chunk-000000")]


def test_latent_cache_unknown_sample_is_a_clear_error(sd_world, tmp_path):
    from vilex.errors import UserError
    from vilex.models import ViLexModel
    from vilex.train.data import model_views
    from vilex.train.latent_cache import LatentCache

    cfg = _cfg(sd_world, tmp_path)
    model = ViLexModel.from_config(cfg.model)
    cache = LatentCache.open_or_build(cfg.latent_cache, model.decoder, cfg.data.train,
                                      model_views(model, cfg.data.train)["decoder"])
    with pytest.raises(UserError, match="has no entry for sample 'nope.png': the data changed"):
        cache.posterior(["nope.png"], [(0, 0)])


def _nan_every(trainer, bad_calls):
    real = trainer.model.loss_from_tokens
    calls = {"n": 0}

    def patched(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.model.loss_from_tokens = patched


def test_nan_losses_are_skipped_and_counted(pixel_world, tmp_path):
    cfg = _cfg(pixel_world, tmp_path, "train.max_steps=6", "train.checkpoint_every=3", decoder="pixel_unet")
    trainer = Pretrainer(cfg)
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    _nan_every(trainer, bad_calls={2, 3, 5})
    summary = trainer.run()
    assert summary["steps"] == 6 and summary["nonfinite_skipped"] == 3
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    assert any(not torch.equal(before[k], v) for k, v in trainer.encoder.state_dict().items())


def test_nan_guard_stops_after_n_in_a_row_keeping_last_good_checkpoint(pixel_world, tmp_path):
    cfg = _cfg(pixel_world, tmp_path, "train.max_steps=10", "train.checkpoint_every=2",
               "train.max_consecutive_nonfinite=3", decoder="pixel_unet")
    trainer = Pretrainer(cfg)
    trainer.setup()
    _nan_every(trainer, bad_calls=set(range(5, 100)))  # steps 1-4 fine, then NaN forever
    with pytest.raises(NonFiniteLossError) as ei:
        trainer.run()
    last = tmp_path / "checkpoints" / "checkpoint-4"
    assert str(ei.value) == (f"3 non-finite losses in a row at step 4; stopping. Last good checkpoint: {last}. "
                             "Lower the learning rate or check the data.")
    assert trainer.ckpts.latest() == last and (last / "trainer_state.json").is_file()


@pytest.mark.parametrize("name, decoder_id, width", [
    ("sd21base_siglip_so400m", "stabilityai/stable-diffusion-2-1-base", 1024),
    ("sd15_siglip_so400m", "stable-diffusion-v1-5/stable-diffusion-v1-5", 768),
])
def test_shipped_real_scale_configs_build_on_meta(name, decoder_id, width):
    from vilex.models.configs import VisionTowerConfig
    from vilex.models.encoder import ViLexEncoder
    from vilex.models.reference_archs import REFERENCE_ARCHS, build_reference

    def num_params(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    cfg = load_config(PretrainConfig, REPO / "configs" / "vilex" / f"{name}.yaml")
    assert cfg.model.decoder.name_or_path == decoder_id and cfg.model.pooler.num_tokens == 75
    assert (cfg.train.optim.lr_vit, cfg.train.optim.lr_pooler, cfg.train.precision) == (1e-5, 3e-4, "bf16")
    assert cfg.train.global_batch_size == 2048 and plan_batches(2048, cfg.train.micro_batch_size, 8).grad_accum == 8
    unet = build_reference(decoder_id, "unet")
    text = build_reference(decoder_id, "text_encoder")
    # the public parameter counts of these checkpoints
    expected = {"stabilityai/stable-diffusion-2-1-base": (865_910_724, 340_387_840),
                "stable-diffusion-v1-5/stable-diffusion-v1-5": (859_520_964, 123_060_480)}[decoder_id]
    assert (num_params(unet), num_params(text)) == expected
    assert unet.config.cross_attention_dim == text.config.hidden_size == width

    vit_arch = REFERENCE_ARCHS[cfg.model.vit.name_or_path]["vision"]
    vit_cfg = VisionTowerConfig(init=vit_arch, feature_layer=cfg.model.vit.feature_layer)
    table = torch.empty(49408, width, device="meta")
    with torch.device("meta"):
        encoder = ViLexEncoder.build(vit_cfg, cfg.model.pooler, table, 77)
    vit_params = num_params(encoder.vit)
    assert 400e6 < vit_params < 430e6  # SigLIP so400m vision tower
    assert encoder.num_tokens == 75 and encoder.token_width == width
    # pooler, counted by hand: context LN + projection, queries, depth x [3 LN, 2 attention (4 linear), MLP 4x],
    # final LN, output projection to the text encoder's embedding width
    w, c, n, d, depth = cfg.model.pooler.width, vit_arch["hidden_size"], 75, width, cfg.model.pooler.depth
    per_block = 3 * 2 * w + 2 * 4 * (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    expected_pooler = 2 * c + (c * w + w) + n * w + depth * per_block + 2 * w + (w * d + d)
    assert num_params(encoder.pooler) == expected_pooler


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vilex", *args], capture_output=True, text=True, cwd=REPO,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args, message", [
    (["--set", "train.max_step=5"], "unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
    (["--set", "train.max_steps=abc"], "train.max_steps: expected int, got 'abc' (str)"),
    (["--set", "train.micro_batch_size=0"], "train.micro_batch_size: must be >= 1, got 0"),
    (["--set", "train.precision=fp8"], "train.precision: must be one of 'fp32', 'bf16'; got 'fp8'"),
    (["--set", "train.strategy=deepspeed"], "train.deepspeed_config is required with train.strategy: deepspeed"),
])
def test_config_errors_through_the_cli(args, message):
    r = _cli("pretrain", "--config", str(TINY_CONFIG), "--dry-run", *args)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_missing_config_file_through_the_cli(tmp_path):
    r = _cli("pretrain", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"


def test_dry_run_names_what_is_missing_and_still_plans():
    """configs/vilex/tiny.yaml reads runs/tiny (built by scripts/make_tiny.py): absent here, so the dry run exits 2
    naming it, after printing the plan (tests/test_dry_run.py runs it on a built world)."""
    r = _cli("pretrain", "--config", str(TINY_CONFIG), "--dry-run", "--set", "train.max_steps=7")
    assert r.returncode == 2, r.stderr
    assert "  steps " in r.stdout and "7 (28 images)" in r.stdout
    assert "decoder text encoder: folder not found: runs/tiny/decoder" in r.stdout


def test_math_attention_with_activation_checkpointing_trains(sd_world, tmp_path):
    """Checkpointed blocks recompute during backward: under the SDPA kernel their forward used (a different kernel
    on recomputation is a CheckpointError), the same losses as without checkpointing."""
    from vilex.train.loop import pretrain

    losses = {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        pretrain(load_config(PretrainConfig, TINY_CONFIG, overrides(
            sd_world, out, "train.max_steps=2", "val.every=1000", "train.attention_backend=math",
            f"model.vit.gradient_checkpointing={checkpointing}",
            f"model.decoder.gradient_checkpointing={checkpointing}")))
        losses[checkpointing] = json.loads((out / "summary.json").read_text())["losses"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_init_from_starts_a_new_schedule_from_trained_encoder_weights(sd_world, tmp_path):
    """train.init_from: the encoder starts from a run's latest weights (ViT and pooler), while the step, optimizer
    and learning rates start fresh; an encoder of another shape is a clear error."""
    from vilex.errors import UserError

    first = Pretrainer(_cfg(sd_world, tmp_path / "first", "train.max_steps=2", "train.checkpoint_every=2",
                            "latent_cache.enabled=false"))
    first.setup()
    first.run()
    trained = {k: v.clone() for k, v in first.encoder.state_dict().items()}

    fresh = Pretrainer(_cfg(sd_world, tmp_path / "fresh", "latent_cache.enabled=false"))
    fresh.setup()
    second = Pretrainer(_cfg(sd_world, tmp_path / "second", "latent_cache.enabled=false", "train.optim.lr_pooler=5e-5",
                             f"train.init_from={tmp_path / 'first'}"))
    second.setup()
    weights = second.encoder.state_dict()
    assert all(torch.equal(weights[k], trained[k]) for k in trained)
    assert not all(torch.equal(fresh.encoder.state_dict()[k], trained[k]) for k in trained)  # training moved them
    assert second.state.step == 0
    assert not second.strategy.optimizer.state  # no moments carried over
    assert {g["name"]: g["initial_lr"] for g in second.strategy.optimizer.param_groups}["pooler"] == 5e-5

    other = Pretrainer(_cfg(sd_world, tmp_path / "other", "latent_cache.enabled=false", "model.pooler.num_tokens=4",
                            f"train.init_from={tmp_path / 'first'}"))
    with pytest.raises(UserError, match="does not match"):
        other.setup()
