"""gpu_inference.py — ViLex reconstruct / compose images/s at 512², 50 DDIM steps, batched guidance, against diffusers'
StableDiffusionPipeline at the same settings with the prompt embeddings passed in, on the same UNet (issue #21, item 3).

    python scripts/bench/gpu_inference.py                        # the GPU run (~45 s on an H200)
    python scripts/bench/gpu_inference.py --device cpu --tiny    # the same code path at tiny shapes (CPU)
    bash scripts/bench/gpu_all.sh --only inference               # as the one GPU script runs it

One set of random weights at SD2.1-base shapes (UNet, VAE, OpenCLIP-H text encoder; held in bf16 as stage 1 holds the
frozen decoder) and a SigLIP-so400m@224 + 5-block pooler encoder (fp32, as ViLexPipeline.from_pretrained loads it),
built by gpu_stage1.Stage1Bench; nothing is downloaded. Three pipelines share those modules:

* ours_reconstruct — vilex.pipeline.ViLexPipeline.reconstruct(images): encode the images (ViT + pooler + frozen text
  encoder) and decode with classifier-free guidance 3.0 against the empty prompt: two UNet branches per step, batched.
* ours_compose — ViLexPipeline.compose(images, prompt): Text-Free Guidance 3.0 between [v] and [v, c] (two branches,
  batched; no CFG on top, the method's default).
* diffusers — diffusers.StableDiffusionPipeline(prompt_embeds=..., negative_prompt_embeds=...), guidance 3.0: two
  branches, batched. The embeddings are the ViLex conditioning of the same images, computed before timing: the
  baseline does not encode anything, ours does (so ours carries the extra work).

All three sample with the same DDIM scheduler (DDIMScheduler.from_config of the decoder's training scheduler), 50 steps,
512² (64² latents), a CPU generator seeded alike, tensors out ("pt"), progress bars off, and include the VAE decode.
Each batch size runs the three in alternating rounds after one warm-up call each (a load change hits all alike);
images/s = batch / median call time. ``--tiny``: the tiny parts of gpu_stage1 at 64 px, fewer steps (dry-run numbers).

Output: JSON (--out) and a table whose last lines are the ratios ours / diffusers (goal: >= 1, "ours must not be
slower").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_stage1 import (
    OURS,
    TINY_SCALE,
    Budget,
    Stage1Bench,
    environment,
    fill_defaults,
    first_line,
    fmt,
    peak_memory_gib,
    reset_memory,
    run_and_report,
    setup_device,
    sync,
    write_json,
)

PIPELINES = ("diffusers", "ours_reconstruct", "ours_compose")
PROMPT = "a watercolor painting"


class InferenceBench:
    def __init__(self, args: argparse.Namespace) -> None:
        import dataclasses

        from diffusers import StableDiffusionPipeline

        from vilex.pipeline import ViLexPipeline

        self.args = args
        self.device = setup_device(args.device)
        self.budget = Budget(args.budget_s)
        self.size = args.resolution // (TINY_SCALE if args.tiny else 1)
        t0 = time.perf_counter()
        parts = Stage1Bench(self.device, args.tiny, "inductor")
        # inference holds the frozen decoder in bf16, no checkpointing (no backward)
        model = parts.model(dataclasses.replace(OURS, checkpointing=False), self.size)
        model.decoder.requires_grad_(False)
        self.ours = ViLexPipeline(model.encoder, model.decoder, model.config)
        self.ours.set_progress_bar_config(disable=True)
        decoder = model.decoder
        self.baseline = StableDiffusionPipeline(
            vae=decoder.vae, text_encoder=decoder.text_encoder, tokenizer=decoder.tokenizer, unet=decoder.unet,
            scheduler=decoder.sampling_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        self.baseline.set_progress_bar_config(disable=True)
        self.result: dict[str, Any] = {
            "part": "inference", "tiny": args.tiny, "environment": environment(self.device),
            "resolution": args.resolution, "pixels": self.size, "num_inference_steps": args.steps,
            "guidance_scale": args.guidance, "tfg_scale": args.guidance, "scheduler": type(self.ours.scheduler).__name__,
            "decoder_dtype": str(decoder.dtype), "params": parts.params, "build_s": time.perf_counter() - t0,
            "budget_s": args.budget_s,
            "rows": [], "complete": False}
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = self.budget.used()
        write_json(self.args.out, self.result)

    def calls(self, batch: int) -> dict[str, Callable[[], Any]]:
        """The three pipelines on the same ``batch`` images (CPU tensors in [0,1], as a user passes them)."""
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(batch, 3, self.size, self.size, generator=gen)
        with torch.no_grad():  # the baseline's prompt embeddings: the ViLex conditioning of the same images
            tokens = self.ours.encode(images)
            cond = self.ours.decoder.encode_text(tokens, tokens.shape[1])
            empty = self.ours.decoder.unconditional(batch)
        steps, g = self.args.steps, self.args.guidance
        return {
            "diffusers": lambda: self.baseline(
                prompt_embeds=cond, negative_prompt_embeds=empty, guidance_scale=g, num_inference_steps=steps,
                height=self.size, width=self.size, generator=torch.Generator().manual_seed(1), output_type="pt").images,
            "ours_reconstruct": lambda: self.ours.reconstruct(
                images, guidance_scale=g, num_inference_steps=steps, seed=1, output_type="pt"),
            "ours_compose": lambda: self.ours.compose(
                images, PROMPT, tfg_scale=g, guidance_scale=1.0, num_inference_steps=steps, seed=1, output_type="pt"),
        }

    def run_batch(self, batch: int) -> None:
        calls = {name: fn for name, fn in self.calls(batch).items() if name in self.args.pipelines}
        times: dict[str, list[float]] = {name: [] for name in calls}
        status: dict[str, str] = {}
        first: dict[str, float] = {}
        reset_memory(self.device)

        def timed(name: str) -> float:
            t0 = time.perf_counter()
            out = calls[name]()
            sync(self.device)
            assert torch.isfinite(out).all(), f"{name}: non-finite images"
            return time.perf_counter() - t0

        for name in calls:  # warm-up: cuDNN autotuning, allocator, scheduler tables
            try:
                first[name] = timed(name)
                status[name] = "ok"
            except torch.OutOfMemoryError as e:
                status[name] = f"oom: {first_line(e)}"
            except Exception as e:  # recorded, never fatal
                status[name] = f"unavailable: {first_line(e)}"
        live = [n for n in calls if status[n] == "ok"]
        for _ in range(self.args.rounds):  # alternating rounds
            longest = max((max(times[n] or [first[n]]) for n in live), default=0.0)
            if not live or self.budget.left() < self.args.min_measure_s + len(live) * longest:
                break
            for name in live:
                times[name].append(timed(name))
        peak = peak_memory_gib(self.device)
        for name in calls:
            row: dict[str, Any] = {"pipeline": name, "batch": batch, "status": status[name],
                                   "first_call_s": first.get(name)}
            if status[name] == "ok" and not times[name]:
                row["status"] = "skipped: time budget"
            elif times[name]:
                call_s = statistics.median(times[name])
                row.update(call_s=call_s, images_per_s=batch / call_s, calls=len(times[name]),
                           unet_branches=2, peak_mem_gib_all_three=peak)
            self.result["rows"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        self.save()

    def run(self) -> None:
        for batch in self.args.batches:
            if self.budget.left() < self.args.min_measure_s:
                self.result["rows"].append({"pipeline": "all", "batch": batch, "status": "skipped: time budget"})
                continue
            self.run_batch(batch)
        self.result["summary"] = self.summary()
        self.result["complete"] = True
        self.save()

    def summary(self) -> list[dict[str, Any]]:
        ok = {(r["pipeline"], r["batch"]): r for r in self.result["rows"] if "images_per_s" in r}
        out = []
        for (name, batch), r in ok.items():
            base = ok.get(("diffusers", batch))
            if name != "diffusers" and base:
                out.append({"pipeline": name, "batch": batch, "vs_diffusers": r["images_per_s"] / base["images_per_s"]})
        return out

    def print_table(self) -> None:
        r0 = self.result
        print(f"\ninference — {r0['environment']['device']}; {r0['pixels']}² ({r0['resolution']}² shapes), "
              f"{r0['num_inference_steps']} {r0['scheduler']} steps, guidance {r0['guidance_scale']} (2 branches, "
              f"batched), decoder {r0['decoder_dtype']}; {self.budget.used():.0f} s")
        print(f"{'pipeline':18} {'batch':>5} {'images/s':>9} {'s/call':>8}  status")
        for r in r0["rows"]:
            print(f"{r['pipeline']:18} {r['batch']:5d} {fmt(r.get('images_per_s'), '9.3f'):>9} "
                  f"{fmt(r.get('call_s'), '8.3f'):>8}  {r['status']}")
        for s in r0.get("summary") or self.summary():
            print(f"{s['pipeline']} / diffusers StableDiffusionPipeline, batch {s['batch']}: {s['vs_diffusers']:.2f}x "
                  f"images/s (goal >= 1.00)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny parts at 512/8 = 64 px (the CPU dry mode)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="images per call (default 1 8; --tiny 1 2)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --tiny 10)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale (ours reconstruct, diffusers); TFG (compose)")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    p.add_argument("--rounds", type=int, default=None, help="timed calls per pipeline and batch (default 2; --tiny 1)")
    p.add_argument("--budget-s", type=float, default=60.0, help="end by then, whatever is left unmeasured")
    p.add_argument("--min-measure-s", type=float, default=None, help="start nothing with less time left (default 5)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/gpu/inference.json"))
    args = p.parse_args(argv)
    fill_defaults(args, {"batches": [1, 2], "steps": 10, "rounds": 1, "min_measure_s": 1.0},
                  {"batches": [1, 8], "steps": 50, "rounds": 2, "min_measure_s": 5.0})
    run_and_report(InferenceBench(args))


if __name__ == "__main__":
    main(sys.argv[1:])
