"""gpu_numerics.py — a tiny stage-1 run on the GPU (bf16, and fp32) and on the CPU (fp32) from the same seed and data:
per-step losses of 20 steps compared against a stated tolerance, to catch CUDA-only dtype or device bugs (issue #21,
item 4).

    python scripts/bench/gpu_numerics.py                       # on the GPU machine (~30 s)
    python scripts/bench/gpu_numerics.py --device cpu          # dry mode: the candidate legs on the CPU too
    bash scripts/bench/gpu_all.sh --only numerics              # as the one GPU script runs it

The run is the real trainer (vilex.train.loop.Pretrainer: setup, data loader, latent cache, strategy, autocast,
micro_step, backward, clipping, AdamW step) on configs/vilex/tiny.yaml's model — a tiny SigLIP, a 1-block pooler of 8
tokens and a tiny SD-like decoder (vilex.models.tiny.build_tiny_sd) — over 48 toy scenes at 16 px, batch 4, 20 steps.
Every leg builds the model on the CPU from ``train.seed`` (identical initial weights), reads the same batches (the
loader is seeded) and draws noise, timesteps and TailDrop from the trainer's CPU generator (identical draws), so the
legs differ only in where and in what precision they compute. Each leg is its own process (``--leg``), the CPU
reference with CUDA_VISIBLE_DEVICES="" so nothing in it can touch the GPU.

Legs: ``cpu:fp32`` (the reference) and, on ``--device`` (cuda; cpu in the dry mode), ``fp32`` (TF32 off) and ``bf16``
(the stage-1 recipe: bf16 autocast, frozen decoder held in bf16, which is also where the VAE encodes the latent cache).

Tolerances (max over the 20 steps of |loss_leg - loss_reference|; the losses are ~1, an MSE of unit-variance noise):
* fp32: 1e-3. Both legs do fp32 arithmetic; they differ only in summation order and kernels (rounding ~1e-6 relative
  per operation), which 20 AdamW steps carry forward without amplifying past ~1e-5 on this model. A wrong device, a
  dropped cast or a missed RNG stream moves the loss by 1e-2 or more.
* bf16: 1e-2. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 % per value); the loss goes through two
  transformers, a UNet and the VAE posterior in bf16 (fp32 accumulation in the matmuls), and the updates then follow
  slightly different gradients. bf16 vs fp32 on the CPU measured max |Δloss| = 8.3e-4 over the 20 steps
  (``--device cpu``, 2026-12-04); CUDA autocasts a somewhat different set of operators and accumulates in other
  orders, so 12x that is allowed. A bug moves far more: the steps' losses spread over 1.02-1.20 with their random
  timesteps and noise, so a leg that draws another timestep, noise or TailDrop length (a generator on the wrong
  device, a stream consumed twice) differs by 0.05-0.15 within 20 steps, and a wrong dtype or device path in the
  conditioning or the target by more.

Output: JSON (--out): every leg's losses, the max |Δ| per candidate and pass/fail; the last line prints max |Δloss|.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2}  # why: the docstring
STEPS = 20


def build_world(root: Path) -> Path:
    """The tiny world of tests/pretrain_helpers.build_tiny_world: a tiny SD decoder folder and 48 toy scenes."""
    from toy.scenes.generate import generate_dataset
    from vilex.models.tiny import build_tiny_sd

    if not (root / "decoder" / "model_index.json").exists():
        build_tiny_sd(root / "decoder", image_size=16)
    if not (root / "data" / "dataset_info.json").exists():
        generate_dataset(root / "data", n=48, seed=0, size=16, overwrite=True, progress=False)
    return root


def run_leg(device: str, precision: str, world: Path, out_dir: Path, steps: int) -> dict[str, Any]:
    """``steps`` training steps of the real trainer on ``device`` in ``precision``; the loss of each."""
    import torch

    from vilex.config import load_config
    from vilex.train.config import PretrainConfig
    from vilex.train.loop import Pretrainer

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference has no TF32
    torch.backends.cudnn.allow_tf32 = False
    if device == "cpu":
        torch.set_num_threads(1)
    bf16 = precision == "bf16"
    overrides = [f"model.decoder.name_or_path={world / 'decoder'}", "model.decoder.type=stable_diffusion",
                 f"model.decoder.dtype={'bfloat16' if bf16 else 'float32'}", f"data.train.path={world / 'data' / 'train'}",
                 f"train.output_dir={out_dir}", f"latent_cache.dir={out_dir / 'latent_cache'}", "log.tensorboard=false",
                 f"train.precision={precision}", f"train.max_steps={steps}", "train.checkpoint_every=1000000",
                 "val.every=1000000", "train.log_every=1000000", "train.peak_tflops=1"]
    cfg = load_config(PretrainConfig, REPO / "configs" / "vilex" / "tiny.yaml", overrides)
    trainer = Pretrainer(cfg)
    assert trainer.strategy.device.type == device, (trainer.strategy.device, device)
    trainer.setup()
    batches = trainer.batches(trainer.state)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        loss = trainer.micro_step(next(batches))
        trainer.strategy.backward(loss)
        trainer.strategy.step()
        losses.append(float(loss))
    return {"device": str(trainer.strategy.device), "precision": precision, "losses": losses,
            "decoder_dtype": str(trainer.decoder.dtype), "seconds": time.perf_counter() - t0,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def start_leg(role: str, leg: str, world: Path, tmp: Path, steps: int) -> tuple[subprocess.Popen, Path]:
    """One leg in its own process (the legs run side by side: the CPU reference and the GPU legs overlap); its run
    folder is named by its role, so the dry mode's two cpu:fp32 legs do not share one."""
    device = leg.split(":")[0]
    out = tmp / f"{role}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VILEX_LOG_LEVEL="WARNING", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the reference cannot touch the GPU
    # -S when this process runs without site-packages (gpu_all.sh --cpu hides what the GPU machine lacks that way)
    python = [sys.executable, *(["-S"] if sys.flags.no_site else [])]
    cmd = [*python, str(Path(__file__).resolve()), "--leg", leg, "--world", str(world), "--steps", str(steps),
           "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out


def finish_leg(leg: str, proc: subprocess.Popen, out: Path) -> dict[str, Any]:
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        return {"leg": leg, "status": f"failed: exit {proc.returncode}", "stderr_tail": stderr[-3000:]}
    return dict(json.loads(out.read_text()), leg=leg, status="ok")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="where the candidate legs run (the reference is always cpu:fp32)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--world", type=Path, default=None, help="tiny world folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/gpu/numerics.json"))
    p.add_argument("--tiny", action="store_true", help="accepted for a uniform command line: the run is always tiny")
    p.add_argument("--leg", default=None, help=argparse.SUPPRESS)  # internal: run one leg, write its JSON
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.leg:
        device, precision = args.leg.split(":")
        args.out.write_text(json.dumps(run_leg(device, precision, args.world, args.out.with_suffix(""), args.steps)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_stage1 import write_json

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device here (the dry mode is --device cpu)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        world = build_world(args.world or tmp / "world")
        device = args.device.split(":")[0]
        legs = {"reference": "cpu:fp32", "fp32": f"{device}:fp32", "bf16": f"{device}:bf16"}
        started_legs = {name: start_leg(name, leg, world, tmp, args.steps) for name, leg in legs.items()}
        results = {name: finish_leg(legs[name], *started) for name, started in started_legs.items()}
    ref = results["reference"]
    comparisons = {}
    for name in ("fp32", "bf16"):
        leg = results[name]
        if ref["status"] != "ok" or leg["status"] != "ok":
            comparisons[name] = {"status": "no comparison: a leg failed"}
            continue
        deltas = [abs(a - b) for a, b in zip(leg["losses"], ref["losses"])]
        worst = max(deltas)
        comparisons[name] = {"max_abs_delta": worst, "mean_abs_delta": sum(deltas) / len(deltas),
                             "worst_step": deltas.index(worst), "tolerance": TOLERANCE[name],
                             "status": "pass" if worst <= TOLERANCE[name] else "FAIL"}
    result = {"part": "numerics", "device": args.device, "steps": args.steps, "legs": results,
              "comparisons": comparisons, "elapsed_s": time.perf_counter() - started, "complete": True}
    write_json(args.out, result)

    print(f"numerics — tiny stage-1 run, {args.steps} steps, same seed and data; reference cpu:fp32")
    for name, leg in results.items():
        if leg["status"] == "ok":
            head = " ".join(f"{x:.4f}" for x in leg["losses"][:5])
            print(f"  {legs[name]:10} ({leg['decoder_dtype']}, {leg['seconds']:.1f} s): losses {head} ...")
        else:
            print(f"  {legs[name]:10} {leg['status']}\n{leg.get('stderr_tail', '')}")
    for name, c in comparisons.items():
        if "max_abs_delta" in c:
            print(f"{legs[name]} vs cpu:fp32: max |Δloss| = {c['max_abs_delta']:.2e} (step {c['worst_step']}), "
                  f"tolerance {c['tolerance']:.0e}: {c['status']}")
        else:
            print(f"{legs[name]} vs cpu:fp32: {c['status']}")


if __name__ == "__main__":
    main(sys.argv[1:])
