"""scripts/bench/sweep_overhead.py — wall time of `vilex eval` (our sweep runner) vs bare `lmms-eval` per pair.

Builds 2 tiny checkpoints and the toy suite in a temp folder, then for the same (model, task) pairs runs
(a) bare ``python -m lmms_eval eval --model vilex_vlm ... --batch_size 1 --log_samples`` once per pair and
(b) the sweep (one worker subprocess per pair, hashing, skip checks, sweep.json), and prints both side by side.
Target: runner overhead ≤ 5%. Offline; CPU is fine (tiny models).

    python scripts/bench/sweep_overhead.py [--tasks vilex_toy_colour,vilex_toy_caption] [--limit 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="vilex_toy_colour,vilex_toy_caption")
    p.add_argument("--limit", type=int, default=3, help="docs per task")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from benchmarks.tiny import build_tiny_toy_suite, build_tiny_vlm_checkpoints

    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf")
        build_tiny_toy_suite(root, n=16, max_per_task=args.limit)
        ckpts = build_tiny_vlm_checkpoints(root, seeds=(0, 1))
        # warm the OS file cache and the datasets cache so neither side pays the first-import cost
        subprocess.run([sys.executable, "-c", "import lmms_eval.evaluator"], check=True)

        start = time.perf_counter()
        for ckpt in ckpts:
            for task in tasks:
                subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--model", "vilex_vlm", "--model_args",
                                f"pretrained={ckpt}", "--tasks", task, "--include_path", str(root / "tasks"),
                                "--batch_size", "1", "--log_samples", "--output_path", str(root / "bare"),
                                "--device", "cpu"], check=True, capture_output=True)
        bare = time.perf_counter() - start

        cfg = root / "sweep.yaml"
        cfg.write_text(f"models: {{a: {ckpts[0]}, b: {ckpts[1]}}}\ntasks: [{', '.join(tasks)}]\n"
                       f"include_path: {root / 'tasks'}\noutput_dir: {root / 'run'}\nuse_cache: false\n")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vilex", "eval", "--config", str(cfg)], check=True,
                       capture_output=True)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vilex", "eval", "--config", str(cfg)], check=True,
                       capture_output=True)
        resume = time.perf_counter() - start

    n = len(ckpts) * len(tasks)
    print(f"| runner | pairs | wall s | s/pair | vs bare |\n|---|---|---|---|---|")
    print(f"| bare lmms-eval (1 process/pair) | {n} | {bare:.1f} | {bare / n:.1f} | 1.00x |")
    print(f"| vilex eval (sweep) | {n} | {ours:.1f} | {ours / n:.1f} | {ours / bare:.2f}x |")
    print(f"| vilex eval rerun (all skipped) | {n} | {resume:.1f} | {resume / n:.1f} | {resume / bare:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
