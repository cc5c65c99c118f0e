"""Shared helpers for the stage-1 training tests: a tiny world on disk and a config pointing at it."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "vilex" / "tiny.yaml"


def build_tiny_world(root: Path, decoder: str = "stable_diffusion", n: int = 48) -> Path:
    from vilex.models.tiny import build_tiny_pixel_decoder, build_tiny_sd
    from toy.scenes.generate import generate_dataset

    build = build_tiny_sd if decoder == "stable_diffusion" else build_tiny_pixel_decoder
    build(root / "decoder", image_size=16)
    generate_dataset(root / "data", n=n, seed=0, size=16, overwrite=True, progress=False)
    return root


def overrides(world: Path, out: Path, *extra: str, decoder: str = "stable_diffusion") -> list[str]:
    return [f"model.decoder.name_or_path={world / 'decoder'}", f"model.decoder.type={decoder}",
            f"data.train.path={world / 'data' / 'train'}", f"train.output_dir={out}",
            f"latent_cache.dir={out / 'latent_cache'}", "log.tensorboard=false", *extra]


def cli_args(world: Path, out: Path, *extra: str, decoder: str = "stable_diffusion") -> list[str]:
    args = ["pretrain", "--config", str(TINY_CONFIG)]
    for o in overrides(world, out, *extra, decoder=decoder):
        args += ["--set", o]
    return args


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", VILEX_LOG_LEVEL="WARNING",
             PYTHONPATH=str(REPO))
    return e


def run_cli(args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = _cmd(args, nproc)
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _cmd(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "vilex", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(random.randint(20000, 40000)), "-m", "vilex", *args]


def run_and_kill(args: list[str], out: Path, after_checkpoint: int, nproc: int = 1, max_delay: float = 0.3,
                 timeout: float = 300) -> int:
    """Start a run, wait until checkpoint-<after_checkpoint> exists, wait a random moment, SIGKILL everything."""
    proc = subprocess.Popen(_cmd(args, nproc), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    target = out / "checkpoints" / f"checkpoint-{after_checkpoint}"
    deadline = time.time() + timeout
    try:
        while not target.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before checkpoint-{after_checkpoint}: {proc.stderr.read()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError("timed out waiting for the checkpoint")
            time.sleep(0.02)
        time.sleep(random.uniform(0, max_delay))
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def held_out_loss(cfg, encoder_state=None):
    """The diffusion (or flow-matching) loss on the first 8 training images x 8 fixed (noise level, noise) draws each,
    with the run's initial encoder or ``encoder_state``: the per-step training loss is too noisy (one random level
    per image) to show learning in a few steps."""
    import torch

    from vilex.data import first_images
    from vilex.models import ViLexModel

    torch.manual_seed(cfg.train.seed)  # the training run's initialisation
    model = ViLexModel.from_config(cfg.model)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    pixels = first_images(cfg.data.train, model.decoder.image_size, 8).images["image"].repeat(8, 1, 1, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.encoder.vit.image_mean, model.encoder.vit.image_std))
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        x0 = model.decoder.to_model_space(pixels * 2 - 1, gen)
        tokens = model.encoder((pixels - mean) / std)
        return float(model.loss_from_tokens(tokens, x0, generator=gen)["loss"])


def assert_learns_and_resumes_bit_identically(make_config, tmp_path: Path) -> None:
    """8 steps of ``make_config(out, *overrides)`` lower the held-out loss; the same run stopped after its step-4
    checkpoint and resumed from it logs the very same losses."""
    import shutil

    import torch

    from vilex.train.loop import pretrain

    full = tmp_path / "full"
    cfg = make_config(full, "train.max_steps=8")
    pretrain(cfg)
    losses = summary(full)["losses"]
    trained = torch.load(full / "checkpoints" / "checkpoint-8" / "encoder.pt", weights_only=True)
    assert len(losses) == 8 and held_out_loss(cfg, trained) < held_out_loss(cfg)

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("checkpoint-8", "summary.json", "*.lock"))
    pretrain(make_config(resumed, "train.max_steps=8"), resume=str(resumed / "checkpoints" / "checkpoint-4"))
    assert summary(resumed)["losses"] == losses
