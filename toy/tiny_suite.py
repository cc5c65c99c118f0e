"""toy/tiny_suite.py — a tiny toy-world benchmark suite (dataset + lmms-eval tasks) for tests and the overhead script."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def build_tiny_toy_suite(root: str | Path, n: int = 12, max_per_task: int | None = 3) -> dict[str, Any]:
    """A toy-world dataset under ``root/toy`` and its lmms-eval tasks under ``root/tasks`` (manifest returned)."""
    from benchmarks.toy_tasks import materialize_toy_tasks
    from toy.scenes.generate import generate_dataset

    root = Path(root)
    generate_dataset(root / "toy", n=n, seed=0, size=32, splits={"train": 0.5, "test": 0.5},
                     progress=False)
    return materialize_toy_tasks(root / "toy" / "test", root / "tasks", max_per_task=max_per_task)
