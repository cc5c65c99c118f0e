"""scripts/bench/sweep_overhead.py — wall time of `vilex eval` (our sweep runner) vs bare `lmms-eval` per pair.

Builds 2 tiny checkpoints and the toy suite in a temp folder, then for the same (model, task) pairs runs
(a) bare ``lmms-eval eval --model vilex_vlm ... --include_path TASKS --batch_size 1 --log_samples`` (the console
    script), one process per pair, exactly what a user would loop over by hand, and
(b) the sweep (``python -m vilex eval --config``: one worker subprocess per pair, hashing, skip checks, sweep.json),
(c) the sweep with ``process_per: model`` (one worker process per model, its tasks in turn),
alternating a, b and c for ``--rounds`` rounds (the machine is shared: the best round of each is reported, all rounds
are printed). Also: the sweep's own cost (its wall time minus the time spent inside its worker subprocesses), a rerun
where every pair is skipped, and what one process costs before it evaluates anything. Target: runner overhead ≤ 5%.
Offline; CPU (tiny models); ``OMP_NUM_THREADS=1`` is set for every process.

    python scripts/bench/sweep_overhead.py [--tasks vilex_toy_colour,vilex_toy_caption] [--limit 3] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="vilex_toy_colour,vilex_toy_caption")
    p.add_argument("--limit", type=int, default=3, help="docs per task")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from benchmarks.tiny import build_tiny_vlm_checkpoints
    from toy.tiny_suite import build_tiny_toy_suite

    tasks = args.tasks.split(",")
    lmms_eval_bin = str(Path(sys.executable).parent / "lmms-eval")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf")
        build_tiny_toy_suite(root, n=16, max_per_task=args.limit)
        ckpts = build_tiny_vlm_checkpoints(root, seeds=(0, 1))
        cfg = root / "sweep.yaml"
        cfg.write_text(f"models: {{a: {ckpts[0]}, b: {ckpts[1]}}}\ntasks: [{', '.join(tasks)}]\n"
                       f"include_path: {root / 'tasks'}\noutput_dir: {root / 'run'}\nuse_cache: false\n")
        # warm the OS file cache and the datasets cache (json -> arrow) so no side pays first-touch costs
        _timed([lmms_eval_bin, "eval", "--model", "vilex_vlm", "--model_args", f"pretrained={ckpts[0]}", "--tasks",
                ",".join(tasks), "--include_path", str(root / "tasks"), "--batch_size", "1", "--log_samples",
                "--output_path", str(root / "warm"), "--device", "cpu"])

        grouped_cfg = root / "sweep_grouped.yaml"
        grouped_cfg.write_text(cfg.read_text().replace(str(root / "run"), str(root / "run_grouped"))
                               + "process_per: model\n")
        bare_rounds, sweep_rounds, inside_rounds, grouped_rounds = [], [], [], []
        for _ in range(args.rounds):
            bare = 0.0
            for ckpt in ckpts:
                for task in tasks:
                    bare += _timed([lmms_eval_bin, "eval", "--model", "vilex_vlm", "--model_args",
                                    f"pretrained={ckpt}", "--tasks", task, "--include_path", str(root / "tasks"),
                                    "--batch_size", "1", "--log_samples", "--output_path", str(root / "bare"),
                                    "--device", "cpu"])
            bare_rounds.append(bare)
            shutil.rmtree(root / "run", ignore_errors=True)
            sweep_rounds.append(_timed([sys.executable, "-m", "vilex", "eval", "--config", str(cfg)]))
            pairs = json.loads((root / "run" / "sweep.json").read_text())["pairs"]
            assert [x["status"] for x in pairs] == ["done"] * len(pairs), pairs
            inside_rounds.append(sum(x["seconds"] for x in pairs))
            shutil.rmtree(root / "run_grouped", ignore_errors=True)
            grouped_rounds.append(_timed([sys.executable, "-m", "vilex", "eval", "--config", str(grouped_cfg)]))
            grouped = json.loads((root / "run_grouped" / "sweep.json").read_text())["pairs"]
            for a, b in zip(pairs, grouped):  # same answers either way
                same = [(Path(x["result_dir"]) / "samples.jsonl").read_text() for x in (a, b)]
                assert b["status"] == "done" and same[0] == same[1], (a, b)
        resume = _timed([sys.executable, "-m", "vilex", "eval", "--config", str(cfg)])

        # what one process pays before evaluating: interpreter + lmms-eval import; + lmms-eval's built-in task index
        imp = min(_timed([sys.executable, "-c", "import lmms_eval.evaluator"]) for _ in range(2))
        index = min(_timed([sys.executable, "-c", "from lmms_eval.tasks import TaskManager; TaskManager()"])
                    for _ in range(2))
        local = min(_timed([sys.executable, "-c", "from lmms_eval.tasks import TaskManager; "
                            f"TaskManager(include_path={str(root / 'tasks')!r}, include_defaults=False)"])
                    for _ in range(2))

    n = len(ckpts) * len(tasks)
    bare, ours = min(bare_rounds), min(sweep_rounds)
    inside = inside_rounds[sweep_rounds.index(ours)]
    grouped = min(grouped_rounds)
    print(f"{n} pairs ({len(ckpts)} tiny checkpoints x {', '.join(tasks)}; {args.limit} docs each), "
          f"{args.rounds} rounds; best round shown; all rounds: bare {[round(x, 1) for x in bare_rounds]} s, "
          f"sweep {[round(x, 1) for x in sweep_rounds]} s, "
          f"sweep process_per=model {[round(x, 1) for x in grouped_rounds]} s\n")
    print("| runner | pairs | wall s | s/pair | vs bare |\n|---|---|---|---|---|")
    print(f"| bare `lmms-eval eval` (1 process/pair) | {n} | {bare:.1f} | {bare / n:.1f} | 1.00x |")
    print(f"| `vilex eval --config` (1 worker process/pair) | {n} | {ours:.1f} | {ours / n:.1f} | {ours / bare:.2f}x |")
    print(f"| ... of which inside the worker processes | {n} | {inside:.1f} | {inside / n:.1f} | {inside / bare:.2f}x |")
    print(f"| ... the runner itself (CLI start, hashing, planning, sweep.json) | {n} | {ours - inside:.1f} | "
          f"{(ours - inside) / n:.2f} | {(ours - inside) / bare:.2f}x |")
    print(f"| `vilex eval --config` with `process_per: model` (1 worker process/model) | {n} | {grouped:.1f} | "
          f"{grouped / n:.1f} | {grouped / bare:.2f}x |")
    print(f"| `vilex eval` rerun (all skipped) | {n} | {resume:.1f} | {resume / n:.2f} | {resume / bare:.2f}x |")
    print("\nfixed cost of one process (best of 2):")
    print(f"  python + import lmms_eval.evaluator: {imp:.1f} s")
    print(f"  python + lmms-eval's built-in task index (TaskManager()): {index:.1f} s")
    print(f"  python + an include_path-only TaskManager (what the worker builds): {local:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
