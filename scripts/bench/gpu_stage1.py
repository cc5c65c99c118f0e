"""gpu_stage1.py — stage-1 training throughput, MFU and peak memory at real model shapes on ONE GPU.

    python scripts/bench/gpu_stage1.py [--batches 16 64] [--steps 10] [--out runs/bench/gpu_stage1.json]

Builds, with RANDOM weights from the architecture configs in vilex/models/reference_archs.py (nothing is
downloaded): an SD2.1-base-shaped UNet (865.9M) + VAE (83.7M) + OpenCLIP-H-shaped text encoder (340.4M), and a
SigLIP-so400m/14-shaped ViT at 224 px + a 5-block pooler (75 tokens, width 1024). Decoder images are 256² (32²
latents). For each batch size it times:

* naive — fp32 everywhere, VAE encode of the batch every step (diffusers textual-inversion style);
* ours  — bf16 autocast with fp32 master weights for the encoder, frozen decoder held in bf16, latents sampled
  from cached VAE posteriors (mean/std tensors, as `vilex cache-latents` stores them), SDPA.

MFU = model FLOPs per step (FlopCounterMode on a forward pass: 3·F_encoder + 2·F_decoder, as the trainer logs
it) / step time / measured dense bf16 matmul peak (8192³ matmuls). Peak memory = torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build_model(decoder_dtype: str):
    import tempfile

    from diffusers import DDPMScheduler

    from vilex.models.configs import DecoderConfig, PoolerConfig, ViLexConfig, VisionTowerConfig
    from vilex.models.decoders import StableDiffusionDecoder
    from vilex.models.encoder import ViLexEncoder
    from vilex.models.reference_archs import REFERENCE_ARCHS, build_reference
    from vilex.models.tiny import write_tiny_clip_tokenizer
    from vilex.models.vilex_model import ViLexModel

    sd = "stabilityai/stable-diffusion-2-1-base"
    with torch.device("cuda"):
        unet = build_reference(sd, "unet", device="cuda")
        vae = build_reference(sd, "vae", device="cuda")
        text = build_reference(sd, "text_encoder", device="cuda")
    tokenizer = write_tiny_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok", pad="!")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False)
    dec_cfg = DecoderConfig(type="stable_diffusion", name_or_path=sd, dtype=decoder_dtype)
    decoder = StableDiffusionDecoder(tokenizer, text, unet, scheduler, vae=vae, config=dec_cfg)
    vit_cfg = VisionTowerConfig(init=dict(REFERENCE_ARCHS["google/siglip-so400m-patch14-224"]["vision"],
                                          vision_use_head=False))
    pool_cfg = PoolerConfig(num_tokens=75, depth=5, heads=16, width=1024)
    encoder = ViLexEncoder.build(vit_cfg, pool_cfg, decoder.embedding_table, 77).cuda()
    cfg = ViLexConfig(vit=vit_cfg, pooler=pool_cfg, decoder=dec_cfg)
    return ViLexModel(encoder, decoder, cfg)


def measure_peak() -> float:
    from vilex.train.throughput import measure_matmul_peak

    return measure_matmul_peak(torch.device("cuda"), torch.bfloat16, seconds=2.0)


def count_flops(model, batch: int, bf16: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.zeros(batch, 3, 224, 224, device="cuda")
    x0 = torch.zeros(batch, 4, 32, 32, device="cuda")
    enc, dec = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        with enc:
            tokens = model.encoder(pixels)
        with dec:
            model.loss_from_tokens(tokens.float(), x0)
    return 3 * enc.get_total_flops() + 2 * dec.get_total_flops()


def run_arm(model, batch: int, ours: bool, steps: int, peak: float) -> dict:
    groups = model.trainable_parameter_groups()
    opt = torch.optim.AdamW([{"params": groups["vit"], "lr": 1e-5}, {"params": groups["pooler"], "lr": 3e-4}],
                            fused=True)
    model.encoder.train()
    images = torch.rand(batch, 3, 256, 256, device="cuda") * 2 - 1
    pixels = torch.rand(batch, 3, 224, 224, device="cuda") * 2 - 1
    mean = torch.randn(batch, 4, 32, 32, device="cuda")
    std = torch.rand(batch, 4, 32, 32, device="cuda") * 0.1

    def step():
        if ours:
            x0 = model.decoder.model_space_from_posterior(mean, std)
        else:
            with torch.no_grad():
                x0 = model.decoder.vae.encode(images).latent_dist.sample() * model.decoder.vae.config.scaling_factor
        with torch.autocast("cuda", torch.bfloat16, enabled=ours):
            loss = model(pixels, x0)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch": batch, "arm": "ours" if ours else "naive", "oom": True}
    flops = count_flops(model, batch, ours)
    return {"batch": batch, "arm": "ours" if ours else "naive", "s_per_step": dt, "img_per_s": batch / dt,
            "mfu": flops / dt / peak, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "tflops_per_step": flops / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("runs/bench/gpu_stage1.json"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    torch.backends.cuda.matmul.allow_tf32 = False  # the naive arm is plain fp32, as in the reference example
    peak = measure_peak()
    rows = []
    for ours, dtype in ((False, "float32"), (True, "bfloat16")):
        model = build_model(dtype)
        for b in args.batches:
            rows.append(run_arm(model, b, ours, args.steps, peak))
            print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "bf16_matmul_peak_tflops": peak / 1e12, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'arm':6} {'batch':>5} {'img/s':>8} {'MFU':>6} {'peak GB':>8}")
    for r in rows:
        if r.get("oom"):
            print(f"{r['arm']:6} {r['batch']:5d}      OOM")
        else:
            print(f"{r['arm']:6} {r['batch']:5d} {r['img_per_s']:8.1f} {r['mfu']:6.1%} {r['peak_mem_gb']:8.1f}")


if __name__ == "__main__":
    main()
