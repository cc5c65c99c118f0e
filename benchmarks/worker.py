"""benchmarks/worker.py — evaluate ONE (model, task) with lmms-eval and write its result folder; the sweep's subprocess.

    python -m benchmarks.worker --spec SPEC.json

SPEC holds model, model_args, task, include_path, include_defaults, gen_kwargs, batch_size, limit, use_cache, out,
device (the sweep sets the worker's CUDA_VISIBLE_DEVICES from its ``devices`` entry; the spec records it).
The worker calls ``lmms_eval.evaluator.simple_evaluate`` in-process (the same code path as the ``lmms-eval`` CLI) with
``log_samples=True`` and writes, atomically, ``out/result.json`` (metrics, task config, versions, n-samples) and
``out/samples.jsonl`` (one line per doc: doc_id, target, resps, filtered_resps and the per-doc metrics). A failure
writes ``out/error.json`` instead and exits 1; the sweep records it and goes on. A spec with ``pairs`` (the sweep's
``process_per: model``) evaluates those tasks in turn in this one process, writing each result when it is done.
A worker whose sweep process dies exits too: the sweep's claims on its pairs go stale and a later sweep reruns them,
so an orphan must not go on writing the same result folders.

Each task runs with its own scratch folder as the working directory: task code writes side files relative to it
(lmms-eval's ``generate_submission_file`` puts ``submissions/*.json`` in the working directory when no output path
is given — the caption tasks' predictions, VQA submission files). They end up in the result folder under
``task_files/``, instead of in whatever folder the sweep was started from, where workers side by side would
overwrite each other's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from vilex.checkpoint import atomic_dir


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def evaluate_one(spec: dict[str, Any], managers: dict[bool, Any] | None = None) -> dict[str, Any]:
    """Run lmms-eval for one task; returns {"metrics", "config", "n_samples", "samples", "versions"}.
    ``managers`` caches the TaskManager (its index) across the tasks of one process."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    # a local task is loaded without lmms-eval's built-in index (which would shadow a local copy of a built-in
    # name, and costs seconds to build); model_name as the lmms-eval CLI passes it (model-specific prompt kwargs)
    managers = {} if managers is None else managers
    defaults = bool(spec.get("include_defaults", True))
    if defaults not in managers:
        managers[defaults] = TaskManager(verbosity="WARNING", include_path=spec.get("include_path") or None,
                                         include_defaults=defaults, model_name=spec["model"])
    tm = managers[defaults]
    out = simple_evaluate(model=spec["model"], model_args=spec["model_args"], tasks=[spec["task"]],
                          batch_size=spec.get("batch_size", 1), device=spec.get("device", "cpu"),
                          limit=spec.get("limit"), log_samples=True, task_manager=tm,
                          gen_kwargs=spec.get("gen_kwargs") or None, use_cache=spec.get("use_cache"),
                          verbosity="WARNING", bootstrap_iters=0)
    task = spec["task"]
    return {"metrics": out["results"][task], "config": out.get("configs", {}).get(task),
            "n_samples": out.get("n-samples", {}).get(task), "versions": out.get("versions", {}).get(task),
            "samples": out.get("samples", {}).get(task, [])}


TASK_FILES = "task_files"


def write_result(out_dir: Path, spec: dict[str, Any], result: dict[str, Any], seconds: float,
                 task_files: Path | None = None) -> None:
    with atomic_dir(out_dir) as tmp:
        tmp = Path(tmp)
        if task_files is not None and any(task_files.iterdir()):
            shutil.copytree(task_files, tmp / TASK_FILES)
        samples = result.pop("samples")
        (tmp / "samples.jsonl").write_text("".join(json.dumps(_jsonable(s), sort_keys=True) + "\n"
                                                  for s in samples))
        # "mirror": the task ran on `vilex eval mirror` data (synthetic): the numbers are not benchmark scores
        (tmp / "result.json").write_text(json.dumps(_jsonable({**result, "spec": spec, "seconds": seconds,
                                                               "mirror": bool(spec.get("mirror"))}),
                                                    indent=1, sort_keys=True))


def _exit_with_parent(poll_s: float = 2.0) -> None:
    """Exit when the process that started this worker is gone (this process is re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    p.add_argument("--spec", required=True, type=Path)
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    common = {k: v for k, v in spec.items() if k != "pairs"}
    pairs = spec.get("pairs") or [{}]  # several tasks of one model (process_per: model), each written when done
    managers: dict[bool, Any] = {}
    failed = 0
    for n, pair in enumerate(pairs, 1):
        one = {**common, **pair}
        out_dir = Path(one["out"])
        print(f"worker: task {n}/{len(pairs)} {one['task']}", flush=True)
        start, started_at = time.perf_counter(), time.time()
        work = out_dir.parent / f".work-{out_dir.name}"  # the task's working directory (its side files)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        home = os.getcwd()
        os.chdir(work)
        result = None
        try:
            result = evaluate_one(one, managers)
        except Exception as e:  # any failure of this one task is recorded, the sweep goes on
            err = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "spec": one}
            (out_dir.parent / f"{out_dir.name}.error.json").write_text(json.dumps(err, indent=1))
            print(f"error: {one['task']}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed += 1
        finally:
            os.chdir(home)
        if result is not None:
            write_result(out_dir, one, {**result, "started_at": started_at}, time.perf_counter() - start, work)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _exit_with_parent()
    sys.exit(main())
