"""stage1_step.py — our stage-1 training step vs a naive loop, same model and batch, side by side (CPU or GPU).

    python scripts/bench/stage1_step.py [--batch 8] [--steps 6] [--rounds 3] [--out runs/bench/stage1_step.json]

Model: an SD-shaped small decoder (VAE 8x down: 128 px -> 16x16 latents; cross-attention UNet; ~11M params in
VAE + UNet; CLIP text encoder width 256) + a SigLIP-shaped ViT (width 192, 4 layers, patch 16) + a 2-block pooler,
all random init; images from the toy world at 128 px.

* naive — in the style of diffusers' textual-inversion example: everything fp32, the VAE encodes the batch every
  step, no latent cache, no activation checkpointing; AdamW over the same two parameter groups.
* ours  — `vilex pretrain`'s step (vilex.train.loop.Pretrainer.micro_step + strategy backward/step): bf16 autocast
  over fp32 master weights, the frozen decoder (text encoder, UNet) held in bf16, latents sampled from the latent
  cache (VAE posterior computed once, before timing), the UNet in channels-last memory format, SDPA attention.

Both read the same data through the same loader (decode included). Rounds alternate naive/ours so machine load
hits both alike; the median step time of each is reported with the ratio naive/ours.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_world(root: Path) -> Path:
    from vilex.models.tiny import build_small_sd
    from toy.scenes.generate import generate_dataset

    if not (root / "decoder" / "model_index.json").exists():
        build_small_sd(root / "decoder")
    if not (root / "data" / "dataset_info.json").exists():
        generate_dataset(root / "data", n=96, seed=0, size=128, overwrite=True, progress=False)
    return root


def make_config(root: Path, out: Path, batch: int, ours: bool, precision: str = "bf16", attention: str = "auto"):
    from vilex.config import load_config
    from vilex.train.config import PretrainConfig

    vit = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 3,
           "image_size": 128, "patch_size": 16, "vision_use_head": False}
    overrides = [
        f"model.vit.init={json.dumps(vit)}", "model.vit.type=siglip",
        "model.pooler.num_tokens=16", "model.pooler.depth=2", "model.pooler.heads=4", "model.pooler.width=256",
        f"model.decoder.name_or_path={root / 'decoder'}", "model.decoder.type=stable_diffusion",
        f"model.decoder.dtype={'bfloat16' if ours and precision == 'bf16' else 'float32'}",
        f"model.decoder.channels_last={str(ours).lower()}",
        f"data.train.path={root / 'data' / 'train'}", f"train.output_dir={out}", f"train.global_batch_size={batch}",
        f"train.precision={precision if ours else 'fp32'}", "train.max_steps=1000000", "val.every=1000000",
        "train.checkpoint_every=1000000", "log.tensorboard=false", f"latent_cache.enabled={str(ours).lower()}",
        f"latent_cache.dir={root / 'latent_cache'}", "train.log_every=1000000",
        f"train.attention_backend={attention if ours else 'auto'}",
    ]
    return load_config(PretrainConfig, Path(__file__).resolve().parents[2] / "configs/vilex/tiny.yaml", overrides)


class Ours:
    """The real trainer's step."""

    def __init__(self, cfg) -> None:
        from vilex.train.loop import Pretrainer

        self.t = Pretrainer(cfg)
        self.t.setup()
        self.it = iter(self.t.loader)

    def step(self) -> float:
        batch = next(self.it)
        loss = self.t.micro_step(batch)
        self.t.strategy.backward(loss)
        self.t.strategy.step()
        return float(loss)


class Naive:
    """textual-inversion style: fp32, VAE encode every step, plain AdamW step."""

    def __init__(self, cfg) -> None:
        from vilex.models import ViLexModel
        from vilex.train.data import training_loader

        torch.manual_seed(0)
        self.model = ViLexModel.from_config(cfg.model)
        groups = self.model.trainable_parameter_groups()
        self.opt = torch.optim.AdamW([{"params": groups["vit"], "lr": 1e-5}, {"params": groups["pooler"], "lr": 3e-4}])
        self.loader = training_loader(self.model, cfg.data.train, cfg.train.global_batch_size, 0, 0, 1)
        self.it = iter(self.loader)
        self.model.encoder.train()

    def step(self) -> float:
        batch = next(self.it)
        vae = self.model.decoder.vae
        with torch.no_grad():
            latents = vae.encode(batch.images["decoder"]).latent_dist.sample() * vae.config.scaling_factor
        loss = self.model(batch.images["encoder"], latents)["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def time_steps(runner, n: int) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) per step. CPU time is the steadier number on a shared machine."""
    out = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        runner.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per round and arm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path("runs/bench/stage1_world"))
    p.add_argument("--out", type=Path, default=Path("runs/bench/stage1_step.json"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--ours-fp32", action="store_true",
                   help="also time our step in fp32 (latent cache, no autocast): bf16 does not pay on every CPU")
    p.add_argument("--ours-cpu", action="store_true",
                   help="also time our CPU recipe: fp32 + train.attention_backend=math (SDPA's unfused kernels)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    root = build_world(args.root)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"naive": Naive(make_config(root, Path(tmp) / "naive", args.batch, ours=False)),
                   "ours": Ours(make_config(root, Path(tmp) / "ours", args.batch, ours=True))}
        if args.ours_fp32:
            runners["ours_fp32"] = Ours(make_config(root, Path(tmp) / "ours32", args.batch, ours=True,
                                                    precision="fp32"))
        if args.ours_cpu:
            runners["ours_cpu_recipe"] = Ours(make_config(root, Path(tmp) / "ours_cpu", args.batch, ours=True,
                                                   precision="fp32", attention="math"))
        for r in runners.values():  # warm-up (allocator, kernels, latent cache already built in setup)
            time_steps(r, 2)
        times = {k: [] for k in runners}
        for _ in range(args.rounds):  # arms alternate, so a load change hits all of them
            for k, r in runners.items():
                times[k] += time_steps(r, args.steps)
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
        "batch": args.batch, "steps_per_arm": len(times["ours"]),
        "naive_s_per_step": med["naive"], "ours_s_per_step": med["ours"],
        "naive_cpu_s_per_step": cpu["naive"], "ours_cpu_s_per_step": cpu["ours"],
        "naive_img_per_s": args.batch / med["naive"], "ours_img_per_s": args.batch / med["ours"],
        "speedup": med["naive"] / med["ours"], "speedup_cpu_time": cpu["naive"] / cpu["ours"],
    }
    # arm -> (suffix of its speed-up keys, label)
    extra_arms = {"ours_fp32": ("fp32", "ours fp32"),
                  "ours_cpu_recipe": ("cpu_recipe", "ours CPU recipe: fp32 + math attention")}
    for arm, (key, _) in extra_arms.items():
        if arm in med:
            result.update({f"{arm}_s_per_step": med[arm], f"{arm}_cpu_s_per_step": cpu[arm],
                           f"speedup_{key}": med["naive"] / med[arm],
                           f"speedup_{key}_cpu_time": cpu["naive"] / cpu[arm]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'arm':16} {'wall s/step':>12} {'img/s':>8} {'cpu s/step':>11}")
    for arm in med:
        print(f"{arm:16} {med[arm]:12.3f} {args.batch / med[arm]:8.2f} {cpu[arm]:11.3f}")
    print(f"speedup (naive / ours): {result['speedup']:.2f}x wall, {result['speedup_cpu_time']:.2f}x CPU time   "
          f"[{result['device']}, batch {args.batch}]")
    for arm, (key, label) in extra_arms.items():
        if arm in med:
            print(f"speedup (naive / {label}): {result[f'speedup_{key}']:.2f}x wall, "
                  f"{result[f'speedup_{key}_cpu_time']:.2f}x CPU time")


if __name__ == "__main__":
    main()
