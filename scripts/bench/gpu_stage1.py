"""gpu_stage1.py — stage-1 training at real model shapes on ONE GPU: img/s, MFU and peak memory of our step against
the naive step, a batch sweep at 256² and 512², and each optimisation measured on its own (issue #21, item 1).

    python scripts/bench/gpu_stage1.py                                   # the GPU run (~4.5 min on an H200)
    python scripts/bench/gpu_stage1.py --device cpu --tiny               # the same code path at tiny shapes (CPU)
    python scripts/bench/gpu_stage1.py --resolutions 256 --batches 256:32,64 --no-compile --budget-s 90
    bash scripts/bench/gpu_all.sh --only stage1                          # as the one GPU script runs it

Model (random weights from the architecture configs in vilex/models/reference_archs.py; nothing is downloaded):
an SD2.1-base-shaped UNet (865.9M) + VAE (83.7M) + OpenCLIP-H-shaped text encoder (340.4M), frozen, and a
SigLIP-so400m/14 ViT at 224 px + a 5-block pooler (75 tokens, width 1024), trained. ``--tiny`` swaps every part for a
few-thousand-parameter model of the same kind and divides the resolutions by 8 (256 -> 32 px).

Recipes (one forward/backward/optimizer step each, built the way the trainer builds it: vilex.train.loop
``Pretrainer.micro_step`` + ``TorchStrategy``):

* naive — diffusers' textual-inversion example as it runs by default: fp32 weights and activations (TF32 matmuls off,
  torch's default cuDNN TF32 convolutions on), the VAE encodes the batch every step, noise drawn on the GPU, no
  activation checkpointing, torch's default (foreach) AdamW, no clipping.
* ours — configs/vilex/sd21base_siglip_so400m.yaml: bf16 autocast over fp32 encoder weights, the frozen decoder held
  in bf16, x0 sampled from the cached VAE posterior (what ``vilex cache-latents`` stores), activation checkpointing in
  the ViT, text encoder and UNet, SDPA with torch's kernel choice, AdamW as TorchStrategy builds it (foreach), grad
  clipping at 1.0, the trainer's CPU generator for noise, timesteps and TailDrop.
* ablations — ours with exactly ONE change, at one batch per resolution (``--ablation-batch``): ``compile``
  (torch.compile of the frozen UNet and of each text-encoder layer, the way conditioning.py calls them),
  ``fused_adamw``, ``channels_last`` (UNet), ``sdpa_math`` (no fused attention kernel), ``sdpa_flash`` /
  ``sdpa_efficient`` / ``sdpa_cudnn`` (one kernel forced), ``no_checkpointing``, ``decoder_fp32`` (the frozen parts
  held in fp32 instead of bf16; they never get weight gradients in any recipe). Then ``paying``: ours with every
  change that beat it by more than 2 % at that resolution, together — the candidate defaults for the real-scale
  configs.

A kernel or compiler that is missing or fails is recorded as "unavailable: <reason>" and the run goes on; an
out-of-memory as "oom". Everything runs against ``--budget-s``: a measurement that would not finish in the time left is
recorded as "skipped: time budget" (order: the sweeps; at 256² the ablations, a kernel profile of ours, compile; the
same at 512²; the paying combinations), so the process ends on its own before the caller's timeout and the JSON
(rewritten after every row) is complete up to there.

Numbers: step time = median of the timed steps, each synchronised (warm-up steps first: cuDNN autotuning, allocator,
compilation). img/s = batch / step time. MFU = model FLOPs per step / step time / measured dense bf16 matmul peak
(8192³ products): FLOPs counted by torch's FlopCounterMode on one forward at batch 2, scaled to the batch, as
3·F_encoder + 2·F_decoder (the trainer's count: the encoder's weight and input gradients; only input gradients
through the frozen decoder); recomputation by checkpointing is not counted (MFU, not HFU). Peak memory =
torch.cuda.max_memory_allocated per measurement. On the CPU (--tiny) MFU is against an fp32 matmul peak and memory is
the process's peak RSS: dry-run numbers, not results.

Output: JSON (--out), and a table whose last lines are the ratios: ours/naive at equal batch and each ablation vs ours.

The helpers at the top (device, budget, timing, JSON, environment, profile) are shared by gpu_vlm.py,
gpu_inference.py and gpu_numerics.py, which import this file.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run by path on the device machine, where the project is not installed
    sys.path.insert(0, str(REPO))


# ====================================================================== shared by the gpu_*.py scripts
def setup_device(name: str) -> torch.device:
    """The device to measure on; a clear exit when a GPU was asked for and there is none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here (the dry mode is --device cpu --tiny)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the dry mode shares a small CPU with other work: one thread, no oversubscription
        torch.set_num_threads(1)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc: field 22 of stat, in clock ticks since boot; 0 elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Budget:
    """Wall-clock seconds a script may still spend (it must end before the caller's timeout kills it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic() - process_age_s()  # the imports before this count against the timeout too

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def used(self) -> float:
        return time.monotonic() - self.start


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (hardware, library versions, TF32 switches, date)."""
    import diffusers
    import transformers

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "diffusers": diffusers.__version__,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        env["gpu_memory_gib"] = round(total / 2**30, 1)
    return env


def matmul_peak(device: torch.device) -> float:
    """The MFU denominator: measured dense bf16 matmul FLOP/s on the GPU (fp32 on the CPU, for the dry mode)."""
    from vilex.train.throughput import measure_matmul_peak

    if device.type == "cuda":
        return measure_matmul_peak(device, torch.bfloat16, seconds=2.0)
    return measure_matmul_peak(device, torch.float32, n=512, seconds=0.3)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    from vilex.train.throughput import peak_memory_bytes

    return peak_memory_bytes(device) / 2**30


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def guarded(fn: Callable[[], dict], device: torch.device) -> dict:
    """``fn()``, or what stopped it: {"status": "oom"} or {"status": "unavailable: <reason>"} (the run goes on)."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        out = {"status": "oom", "error": first_line(e)}
    except Exception as e:  # a missing kernel, a compiler failure, ...: recorded, never fatal
        out = {"status": f"unavailable: {first_line(e)}"}
    reset_memory(device)
    return out


def timed_steps(step: Callable[[], Any], device: torch.device, budget: Budget, warmup: int, steps: int,
                min_steps: int = 2, reserve_s: float = 3.0) -> dict:
    """Warm-up steps, then up to ``steps`` timed ones (each synchronised; as many as the budget allows, at least
    ``min_steps`` or none). The first step's time is kept (it holds compilation and autotuning)."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    per = first
    for _ in range(warmup - 1):
        t0 = time.perf_counter()
        step()
        sync(device)
        per = time.perf_counter() - t0
    n = min(steps, int((budget.left() - reserve_s) / max(per, 1e-6)))
    if n < min_steps:
        return {"status": "skipped: time budget", "first_step_s": first}
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"status": "ok", "first_step_s": first, "step_s": statistics.median(times),
            "step_s_mean": statistics.fmean(times), "steps": n}


def top_kernels(step: Callable[[], Any], device: torch.device, k: int = 15, steps: int = 2) -> dict[str, Any]:
    """The ``k`` kernels (GPU) or operators (CPU) with the most self time over ``steps`` profiled steps, and how busy
    the device was (kernel time / wall time: well under 1 means launch- or host-bound, not arithmetic-bound)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    if device.type == "cuda":  # kernels only; the attribute was renamed (cuda -> device) across torch versions
        def self_time(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

        events = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]
    else:
        def self_time(e):
            return e.self_cpu_time_total
    total = sum(self_time(e) for e in events) or 1.0
    ranked = sorted(events, key=self_time, reverse=True)[:k]
    return {"wall_ms_per_step": wall_us / 1e3 / steps, "kernel_ms_per_step": total / 1e3 / steps,
            "busy": total / wall_us,
            "top": [{"name": e.key[:120], "self_ms_per_step": self_time(e) / 1e3 / steps, "share": self_time(e) / total,
                     "calls_per_step": e.count / steps} for e in ranked]}


def write_json(path: Path, data: dict) -> None:
    """Atomically (a timeout never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def fill_defaults(args: Any, tiny: dict[str, Any], full: dict[str, Any]) -> None:
    """Options left unset (None) take the --tiny or the full-scale default."""
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def run_and_report(bench: Any) -> None:
    """Run; whatever was measured before a failure or a timeout is still saved and printed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        bench.run()
    finally:
        bench.save()
        bench.print_table()


def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


# ====================================================================== stage 1: shapes
SD = "stabilityai/stable-diffusion-2-1-base"
SIGLIP = "google/siglip-so400m-patch14-224"

# --tiny: the same kinds of parts, a few thousand parameters each (an 8x VAE and a 2-level UNet, like SD's 4 levels
# at a resolution where 2 fit); resolutions are divided by 8, so 256 -> 32 px -> 4x4 latents.
TINY_SCALE = 8
TINY_SD = {
    "unet": dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64,
                 attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=8, sample_size=8),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215, sample_size=64),
    "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, hidden_act="gelu", projection_dim=64),
}
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one training step runs (the fields are the optimisations measured)."""

    name: str
    decoder_dtype: str = "bfloat16"
    autocast: bool = True
    latent_cache: bool = True
    checkpointing: bool = True
    channels_last: bool = False
    fused_adamw: bool = False
    attention: str = "auto"  # auto | math | flash | efficient | cudnn
    compile: bool = False
    clip: bool = True
    trainer_generator: bool = True  # noise/timesteps/TailDrop from the trainer's CPU generator (naive: on the GPU)


NAIVE = Recipe("naive", decoder_dtype="float32", autocast=False, latent_cache=False, checkpointing=False, clip=False,
               trainer_generator=False)
OURS = Recipe("ours")
# each: ONE change from OURS (compile last: it is the slow one)
ABLATIONS: dict[str, dict[str, Any]] = {
    "fused_adamw": {"fused_adamw": True},
    "channels_last": {"channels_last": True},
    "sdpa_math": {"attention": "math"},
    "sdpa_flash": {"attention": "flash"},
    "sdpa_efficient": {"attention": "efficient"},
    "sdpa_cudnn": {"attention": "cudnn"},
    "no_checkpointing": {"checkpointing": False},
    "decoder_fp32": {"decoder_dtype": "float32"},
    "compile": {"compile": True},
}
PAYS = 1.02  # an ablation "pays" when it beats ours by more than 2 % img/s (run-to-run spread is ~1 %)


def attention_context(kind: str):
    """SDPA kernel choice for the forward (the backward follows it): the trainer's own switch for auto/math."""
    from vilex.train.common import attention_kernels

    if kind in ("auto", "math"):
        return attention_kernels(kind)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]])


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether a transformers model checkpoints its layers (``is_gradient_checkpointing`` before 5.x's rename)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def checkpointing_off(model: torch.nn.Module) -> None:
    """Undo transformers' activation checkpointing (named ``gradient_checkpointing_*`` before 5.x's rename)."""
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()


class Stage1Bench:
    """The frozen parts and the encoder, built once; ``model(recipe)`` wraps them the way a recipe needs.

    Building the 1.7B random parameters once keeps every recipe on the same weights and saves the rebuild time; a
    recipe's wrapper (FrozenDecoder, SiglipTower) applies its dtype, memory format and checkpointing to the shared
    modules, and ``_neutral()`` undoes them first."""

    def __init__(self, device: torch.device, tiny: bool, compile_backend: str) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel

        from vilex.models.configs import PoolerConfig, VisionTowerConfig
        from vilex.models.encoder import AttentionPooler
        from vilex.models.reference_archs import REFERENCE_ARCHS
        from vilex.models.tiny import write_tiny_clip_tokenizer

        self.device, self.tiny, self.compile_backend = device, tiny, compile_backend
        self.tokenizer = write_tiny_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok", pad="!")  # SD2's pad "!"
        arch = TINY_SD if tiny else REFERENCE_ARCHS[SD]
        text_kwargs = dict(arch["text_encoder"])
        if tiny:  # a vocabulary the tiny tokenizer's ids fit in
            text_kwargs.update(vocab_size=len(self.tokenizer), bos_token_id=self.tokenizer.bos_token_id,
                               eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        vit_kwargs = dict(TINY_VIT if tiny else REFERENCE_ARCHS[SIGLIP]["vision"], vision_use_head=False)
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device: seconds for 1.7B parameters on a GPU
            self.unet = UNet2DConditionModel(**arch["unet"])
            self.vae = AutoencoderKL(**arch["vae"])
            self.text = CLIPTextModel(CLIPTextConfig(**text_kwargs))
            self.vit = SiglipVisionModel(SiglipVisionConfig(**vit_kwargs))
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, prediction_type="epsilon", clip_sample=False,
                                       steps_offset=1)  # SD2.1-base's scheduler config
        self.vit_cfg = VisionTowerConfig(init=vit_kwargs)
        self.pool_cfg = (PoolerConfig(num_tokens=8, depth=1, heads=2, width=32, mlp_ratio=2.0) if tiny else
                         PoolerConfig(num_tokens=75, depth=5, heads=16, width=1024))
        table = self.text.get_input_embeddings().weight
        self.pooler = AttentionPooler(num_tokens=self.pool_cfg.num_tokens, input_width=self.vit.config.hidden_size,
                                      output_width=int(table.shape[1]), width=self.pool_cfg.width,
                                      depth=self.pool_cfg.depth, heads=self.pool_cfg.heads,
                                      mlp_ratio=self.pool_cfg.mlp_ratio).to(device)
        self.pooler.set_embedding_statistics(table)
        from vilex.models.conditioning import _text_core

        self.text_layers = _text_core(self.text).encoder.layers
        self.raw_layers = list(self.text_layers)
        self.compiled: tuple[torch.nn.Module, list[torch.nn.Module]] | None = None
        self.params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                       (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text), ("vit", self.vit),
                        ("pooler", self.pooler))}

    @property
    def encoder_image_size(self) -> int:
        return int(self.vit.config.image_size)

    def _neutral(self) -> None:
        """The shared modules as built: contiguous, no checkpointing, eval, uncompiled text layers."""
        self.unet.to(memory_format=torch.contiguous_format)
        if self.unet.is_gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        for module in (self.text, self.vit):
            if checkpointing_on(module):
                checkpointing_off(module)
        for i, layer in enumerate(self.raw_layers):
            self.text_layers[i] = layer
        self.text.train(False)

    def _compiled_parts(self) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        """torch.compile wrappers of the UNet and of each text-encoder layer (conditioning.py calls the layers one by
        one), made once so their compiled code is reused; static shapes (each batch/resolution compiles once)."""
        if self.compiled is None:
            compile_ = lambda m: torch.compile(m, backend=self.compile_backend, dynamic=False)
            self.compiled = (compile_(self.unet), [compile_(layer) for layer in self.raw_layers])
        return self.compiled

    def model(self, recipe: Recipe, resolution: int):
        from vilex.models.configs import DecoderConfig, ViLexConfig
        from vilex.models.decoders import StableDiffusionDecoder
        from vilex.models.encoder import ViLexEncoder
        from vilex.models.towers import SiglipTower
        from vilex.models.vilex_model import ViLexModel

        self._neutral()
        dec_cfg = DecoderConfig(type="stable_diffusion", name_or_path=f"random weights, {SD} shapes",
                                resolution=resolution, dtype=recipe.decoder_dtype,
                                gradient_checkpointing=recipe.checkpointing, channels_last=recipe.channels_last)
        decoder = StableDiffusionDecoder(self.tokenizer, self.text, self.unet, self.scheduler, vae=self.vae,
                                         config=dec_cfg)
        if recipe.compile:
            unet, layers = self._compiled_parts()
            decoder.unet = unet
            for i, layer in enumerate(layers):
                self.text_layers[i] = layer
        tower = SiglipTower(self.vit, feature_layer=-1, gradient_checkpointing=recipe.checkpointing)
        encoder = ViLexEncoder(tower, self.pooler)
        model = ViLexModel(encoder, decoder, ViLexConfig(vit=self.vit_cfg, pooler=self.pool_cfg, decoder=dec_cfg))
        model.encoder.train()
        return model

    # ------------------------------------------------------------------ FLOPs
    def flops_per_image(self, resolution: int) -> float:
        """Model FLOPs of one training step per image: 3·F_encoder + 2·F_decoder, counted at batch 2."""
        from torch.utils.flop_counter import FlopCounterMode

        model = self.model(OURS, resolution)
        batch, size = 2, self.encoder_image_size
        pixels = torch.zeros(batch, 3, size, size, device=self.device)
        x0 = torch.zeros(batch, *model.decoder.model_space_shape, device=self.device)
        enc, dec = FlopCounterMode(display=False), FlopCounterMode(display=False)
        with torch.autocast(self.device.type, torch.bfloat16):
            with enc:
                tokens = model.encoder(pixels)
            with dec:
                model.loss_from_tokens(tokens.float(), x0, generator=torch.Generator().manual_seed(0))
        return (3 * enc.get_total_flops() + 2 * dec.get_total_flops()) / batch

    # ------------------------------------------------------------------ one training step
    def step_fn(self, recipe: Recipe, resolution: int, batch: int) -> tuple[Callable[[], float], Callable[[], None]]:
        """(step, cleanup): one optimizer step of ``recipe`` at this batch and resolution."""
        model = self.model(recipe, resolution)
        decoder = model.decoder
        groups = model.trainable_parameter_groups()
        kwargs = {"fused": True} if recipe.fused_adamw else {}
        opt = torch.optim.AdamW([{"params": groups["vit"], "lr": 1e-5}, {"params": groups["pooler"], "lr": 3e-4}],
                                **kwargs)
        params = groups["vit"] + groups["pooler"]
        gen = torch.Generator().manual_seed(0) if recipe.trainer_generator else None
        data = torch.Generator(device=self.device).manual_seed(1)
        size = self.encoder_image_size
        pixels = torch.rand(batch, 3, size, size, device=self.device, generator=data) * 2 - 1
        images = torch.rand(batch, 3, resolution, resolution, device=self.device, generator=data) * 2 - 1
        if recipe.latent_cache:  # the cache build: the VAE posterior once, before any step (chunked: VAE memory)
            parts = [decoder.encode_posterior(chunk) for chunk in images.split(16)]
            mean, std = torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
            del images

        def step() -> float:
            if recipe.latent_cache:
                x0 = decoder.model_space_from_posterior(mean, std, gen)
            else:
                with torch.no_grad():
                    x0 = decoder.to_model_space(images)
            # The kernel choice spans the backward too: checkpointed blocks recompute their forward there, and a
            # recomputation with another SDPA kernel than the forward's fails (torch.utils.checkpoint compares the
            # saved tensors' metadata) — the trainer enters attention_kernels() around the forward only.
            with attention_context(recipe.attention):
                with torch.autocast(self.device.type, torch.bfloat16, enabled=recipe.autocast):
                    tokens = model.encoder(pixels)
                    loss = model.loss_from_tokens(tokens.float(), x0, generator=gen)["loss"]
                loss.backward()
            if recipe.clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def cleanup() -> None:
            opt.zero_grad(set_to_none=True)
            opt.state.clear()

        return step, cleanup


# ====================================================================== stage 1: the run
class Stage1Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = setup_device(args.device)
        self.budget = Budget(args.budget_s)
        self.scale = TINY_SCALE if args.tiny else 1
        t0 = time.perf_counter()
        self.bench = Stage1Bench(self.device, args.tiny, args.compile_backend)
        build_s = time.perf_counter() - t0
        self.peak = matmul_peak(self.device)
        self.flops: dict[int, float] = {}
        self.result: dict[str, Any] = {
            "part": "stage1", "tiny": args.tiny, "environment": environment(self.device),
            "matmul_peak_tflops": self.peak / 1e12, "params": self.bench.params, "build_s": build_s,
            "budget_s": args.budget_s,
            "recipes": {"naive": dataclasses.asdict(NAIVE), "ours": dataclasses.asdict(OURS)},
            "rows": [], "profile": {}, "complete": False}
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = self.budget.used()
        write_json(self.args.out, self.result)

    def pixels(self, resolution: int) -> int:
        return resolution // self.scale

    def measure(self, recipe: Recipe, resolution: int, batch: int, group: str, ablation: str | None = None) -> dict:
        """One row: img/s, MFU, peak memory of ``recipe`` (or why there is no number)."""
        px = self.pixels(resolution)
        row: dict[str, Any] = {"group": group, "recipe": recipe.name, "ablation": ablation, "resolution": resolution,
                               "pixels": px, "batch": batch}
        if self.budget.left() < self.estimate_s(recipe, resolution, batch):
            row["status"] = "skipped: time budget"
        else:
            reset_memory(self.device)
            cleanup: list[Callable[[], None]] = []

            # the naive step is slow (fp32) and steady (arithmetic-bound): fewer steps, one warm-up (the process is
            # warm: ours ran before it at this resolution)
            warmup, steps = (1, self.args.naive_steps) if recipe.name == "naive" else (self.args.warmup, self.args.steps)

            def run() -> dict:
                step, done = self.bench.step_fn(recipe, px, batch)
                cleanup.append(done)
                return timed_steps(step, self.device, self.budget, warmup, steps, min_steps=min(2, steps))

            row.update(guarded(run, self.device))
            for done in cleanup:
                done()
            if row.get("status") == "ok":
                flops = self.flops[resolution] * batch
                row.update(img_per_s=batch / row["step_s"], mfu=flops / row["step_s"] / self.peak,
                           tflops_per_step=flops / 1e12, peak_mem_gib=peak_memory_gib(self.device))
            reset_memory(self.device)
        self.result["rows"].append(row)
        self.save()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        return row

    def estimate_s(self, recipe: Recipe, resolution: int, batch: int) -> float:
        """Time a row needs at least: its warm-up and two timed steps at a pessimistic efficiency (20 % of the bf16
        peak with autocast, 3 % without: fp32 without TF32 runs at about a tenth of it), the start margin, and the
        compile reserve when it compiles."""
        efficiency = 0.2 if recipe.autocast else 0.03
        step = self.flops[resolution] * batch / (efficiency * self.peak)
        reserve = self.args.compile_reserve_s if recipe.compile else 0.0
        warmup = 1 if recipe.name == "naive" else self.args.warmup
        return self.args.min_measure_s + (warmup + 2) * step + reserve

    def best(self, resolution: int, recipe: str = "ours", group: str = "sweep") -> dict | None:
        rows = [r for r in self.result["rows"] if r["resolution"] == resolution and r["recipe"] == recipe
                and r["group"] == group and r.get("status") == "ok"]
        return max(rows, key=lambda r: r["img_per_s"]) if rows else None

    def sweep(self, resolution: int) -> None:
        """Ours over the batches (ascending; stops at an OOM or when a larger batch is slower), then naive."""
        for batch in self.args.batches[resolution]:
            row = self.measure(OURS, resolution, batch, "sweep")
            if row.get("status") == "oom":
                break
            best = self.best(resolution)
            if row.get("status") == "ok" and best is not row and row["img_per_s"] < best["img_per_s"]:
                break
        for batch in self.args.naive_batches[resolution]:
            if self.measure(NAIVE, resolution, batch, "sweep").get("status") == "oom":
                break

    def ablations(self, resolution: int, names: list[str]) -> None:
        batch = self.args.ablation_batch[resolution]
        if not any(r["group"] == "ablation" and r["resolution"] == resolution and r["recipe"] == "ours"
                   for r in self.result["rows"]):
            self.measure(OURS, resolution, batch, "ablation")  # the reference, right before its ablations
        for name in names:
            self.measure(dataclasses.replace(OURS, name=name, **ABLATIONS[name]), resolution, batch, "ablation",
                         ablation=name)

    def paying(self, resolution: int) -> None:
        """Ours with every ablation that paid at this resolution, together (sdpa_*: the fastest kernel only)."""
        base = self.best(resolution, group="ablation")
        if base is None:
            return
        winners = [r for r in self.result["rows"] if r["group"] == "ablation" and r["resolution"] == resolution
                   and r.get("ablation") in ABLATIONS and r.get("status") == "ok"
                   and r["img_per_s"] > PAYS * base["img_per_s"]]
        chosen: dict[str, str] = {}  # recipe field -> the ablation that sets it (one attention kernel: the fastest)
        for r in sorted(winners, key=lambda r: r["img_per_s"]):
            for field in ABLATIONS[r["ablation"]]:
                chosen[field] = r["ablation"]
        names = sorted(set(chosen.values()))
        if len(names) < 2:  # one winner alone is already measured as its ablation
            return
        batch = self.args.ablation_batch[resolution]
        changes = {k: v for name in names for k, v in ABLATIONS[name].items()}
        row = self.measure(dataclasses.replace(OURS, name="paying", **changes), resolution, batch, "ablation",
                           ablation="paying: " + "+".join(names))
        if "compile" in names and row.get("status", "").startswith("unavailable") and len(names) > 2:
            # compiled together with the others it failed: the others alone are still the candidate defaults
            names.remove("compile")
            changes.pop("compile")
            self.measure(dataclasses.replace(OURS, name="paying", **changes), resolution, batch, "ablation",
                         ablation="paying: " + "+".join(names))

    def profile(self, resolution: int) -> None:
        """Top kernels of ours at the best batch of this resolution (the note's profile when a goal is missed)."""
        best = self.best(resolution)
        if best is None or self.budget.left() < self.args.min_measure_s + 3 * best["step_s"]:
            self.result["profile"][str(resolution)] = {"status": "skipped: time budget"}
            return
        px = self.pixels(resolution)

        def run() -> dict:
            step, done = self.bench.step_fn(OURS, px, best["batch"])
            step()  # warm: the profile must not see first-call costs
            sync(self.device)
            profile = top_kernels(step, self.device)
            done()
            return {"status": "ok", "batch": best["batch"], **profile}

        self.result["profile"][str(resolution)] = guarded(run, self.device)
        reset_memory(self.device)
        self.save()

    def run(self) -> None:
        resolutions = self.args.resolutions
        for res in resolutions:
            self.flops[res] = self.bench.flops_per_image(self.pixels(res))
        self.result["tflops_per_image"] = {str(r): f / 1e12 for r, f in self.flops.items()}
        # Priority order (what the budget cuts is what comes last): the sweeps (the headline numbers); every
        # optimisation at the first resolution, its kernel profile, compile there (the slow one); then the same at the
        # other resolutions; then the paying combinations.
        for res in resolutions:
            self.sweep(res)
        plain = [a for a in self.args.ablations if a != "compile"]
        compiled = [a for a in self.args.ablations if a == "compile"]
        for i, res in enumerate(resolutions):
            self.ablations(res, plain)
            if i == 0:
                self.profile(res)
            self.ablations(res, compiled)
        for res in resolutions:
            self.paying(res)
        self.result["summary"] = self.summary()
        self.result["complete"] = True
        self.save()

    # ------------------------------------------------------------------ ratios
    def summary(self) -> dict[str, Any]:
        rows = [r for r in self.result["rows"] if r.get("status") == "ok"]
        out: dict[str, Any] = {"ours_vs_naive": [], "paying_vs_naive": [], "ablations": [], "best": {}}
        for res in self.args.resolutions:
            best = self.best(res)
            if best:
                out["best"][str(res)] = {"batch": best["batch"], "img_per_s": best["img_per_s"], "mfu": best["mfu"],
                                         "peak_mem_gib": best["peak_mem_gib"]}
            for naive in (r for r in rows if r["resolution"] == res and r["recipe"] == "naive"):
                ours = next((r for r in rows if r["resolution"] == res and r["recipe"] == "ours"
                             and r["group"] == "sweep" and r["batch"] == naive["batch"]), None)
                if ours:
                    out["ours_vs_naive"].append({"resolution": res, "batch": naive["batch"],
                                                 "speedup": ours["img_per_s"] / naive["img_per_s"]})
            for paying in (r for r in rows if r["resolution"] == res and r["recipe"] == "paying"):
                naive = next((r for r in rows if r["resolution"] == res and r["recipe"] == "naive"
                              and r["batch"] == paying["batch"]), None)
                if naive:
                    out["paying_vs_naive"].append({"resolution": res, "batch": naive["batch"],
                                                   "ablation": paying["ablation"],
                                                   "speedup": paying["img_per_s"] / naive["img_per_s"]})
            base = self.best(res, group="ablation")
            for r in rows:
                if base and r["resolution"] == res and r["group"] == "ablation" and r.get("ablation"):
                    out["ablations"].append({"resolution": res, "ablation": r["ablation"],
                                             "speedup": r["img_per_s"] / base["img_per_s"],
                                             "peak_mem_ratio": r["peak_mem_gib"] / max(base["peak_mem_gib"], 1e-9)})
        return out

    def print_table(self) -> None:
        env = self.result["environment"]
        print(f"\nstage 1 — {env['device']}, torch {env['torch']}; bf16 matmul peak {self.peak / 1e12:.0f} TFLOP/s; "
              f"{self.budget.used():.0f} s")
        print(f"{'group':8} {'recipe':28} {'res':>4} {'batch':>5} {'img/s':>8} {'MFU':>6} {'peak GiB':>8}  status")
        for r in self.result["rows"]:
            name = r["ablation"] or r["recipe"]
            print(f"{r['group']:8} {name[:28]:28} {r['resolution']:4d} {r['batch']:5d} {fmt(r.get('img_per_s'), '8.1f'):>8} "
                  f"{fmt(r.get('mfu'), '6.1%'):>6} {fmt(r.get('peak_mem_gib'), '8.1f'):>8}  {r.get('status')}")
        for res, prof in self.result["profile"].items():
            if "busy" in prof:
                print(f"  profile {res}² batch {prof['batch']}: kernels {prof['kernel_ms_per_step']:.1f} ms of "
                      f"{prof['wall_ms_per_step']:.1f} ms per step ({prof['busy']:.0%} busy)")
            for k in prof.get("top", [])[:8]:
                print(f"  profile {res}: {k['share']:6.1%} {k['self_ms_per_step']:8.2f} ms/step  {k['name'][:80]}")
        summary = self.result.get("summary") or self.summary()
        for res, b in summary["best"].items():
            print(f"best ours at {res}²: batch {b['batch']}, {b['img_per_s']:.1f} img/s, MFU {b['mfu']:.1%} "
                  f"(goal >= 40 % at 256²), {b['peak_mem_gib']:.1f} GiB")
        for a in summary["ablations"]:
            print(f"ablation {a['ablation']} at {a['resolution']}²: {a['speedup']:.2f}x ours img/s, "
                  f"{a['peak_mem_ratio']:.2f}x its memory")
        for s in summary["paying_vs_naive"]:
            print(f"{s['ablation']} / naive at {s['resolution']}², batch {s['batch']}: {s['speedup']:.2f}x")
        for s in summary["ours_vs_naive"]:
            print(f"ours / naive at {s['resolution']}², batch {s['batch']}: {s['speedup']:.2f}x (goal >= 3x)")


def parse_batches(specs: list[str]) -> dict[int, list[int]]:
    """['256:32,64', '512:16'] -> {256: [32, 64], 512: [16]}"""
    out = {}
    for spec in specs:
        res, _, batches = spec.partition(":")
        out[int(res)] = [int(b) for b in batches.split(",") if b]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny parts, resolutions / 8 (the CPU dry mode)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batches", nargs="+", default=None,
                   help="ours' batch sweep per resolution, ascending, stopping at an OOM or a slower batch "
                        "(default 256:32,64,128,256 512:16,32,64,128; --tiny 256:2,4 512:2)")
    p.add_argument("--naive-batches", nargs="+", default=None, help="default 256:32,64 512:16,32; --tiny 256:2 512:2")
    p.add_argument("--ablation-batch", nargs="+", default=None,
                   help="the one batch per resolution the ablations run at, small enough for no_checkpointing and "
                        "decoder_fp32 (default 256:64 512:32; --tiny 256:2 512:2)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--no-compile", action="store_true", help="leave out the compile ablation")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; aot_eager with --tiny: it traces the same graphs "
                        "in seconds on a CPU, where inductor would spend minutes compiling C++)")
    p.add_argument("--compile-reserve-s", type=float, default=None,
                   help="start a compile row only with this much time left (default 100; --tiny 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 2; --tiny 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per row, fewer when the budget runs low (default 5; --tiny 1)")
    p.add_argument("--naive-steps", type=int, default=None, help="timed steps of a naive row (default 3; --tiny 1)")
    p.add_argument("--budget-s", type=float, default=270.0, help="end by then, whatever is left unmeasured")
    p.add_argument("--min-measure-s", type=float, default=None, help="start no row with less time left (default 8)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/gpu/stage1.json"))
    args = p.parse_args(argv)
    real = {"batches": ["256:32,64,128,256", "512:16,32,64,128"], "naive_batches": ["256:32,64", "512:16,32"],
            "ablation_batch": ["256:64", "512:32"], "compile_backend": "inductor", "compile_reserve_s": 100.0,
            "warmup": 2, "steps": 5, "naive_steps": 3, "min_measure_s": 8.0}
    tiny = {"batches": ["256:2,4", "512:2"], "naive_batches": ["256:2", "512:2"], "ablation_batch": ["256:2", "512:2"],
            "compile_backend": "aot_eager", "compile_reserve_s": 20.0, "warmup": 1, "steps": 1,
            "naive_steps": 1, "min_measure_s": 1.0}
    for key, value in (tiny if args.tiny else real).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.no_compile and "compile" in args.ablations:
        args.ablations.remove("compile")
    args.batches, args.naive_batches = parse_batches(args.batches), parse_batches(args.naive_batches)
    args.ablation_batch = {r: b[0] for r, b in parse_batches(args.ablation_batch).items()}
    for res in args.resolutions:
        args.batches.setdefault(res, [])
        args.naive_batches.setdefault(res, [])
        args.ablation_batch.setdefault(res, min(args.batches[res] or [2]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the naive arm (autocast arms are bf16)
    run = Stage1Run(args)
    try:
        run.run()
    finally:
        run.save()
        run.print_table()


if __name__ == "__main__":
    main(sys.argv[1:])
