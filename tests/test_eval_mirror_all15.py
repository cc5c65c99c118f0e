"""All 15 paper tasks end to end on their mirrors (slow: ~6 min on 2 cores, most of it the four caption tasks'
Java scorers).

`vilex eval mirror` on the REAL configs/benchmarks/paper15.yaml, `vilex eval --cache` with one tiny VLM on CPU (the
config's own model_args, headline metrics and task list), then: every task yields its headline metric as a number,
`vilex eval report` builds the 15-row table and the plot (labelled MIRROR), a rerun recomputes nothing, `prepare
--check` passes, and each task's own scorer gives the mirror's gold answers the top score.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_eval_mirror import (PAPER15, PAPER15_TASKS, check_perfect, headline, last_json, oracle_scores,
                              sweep_args)

from vilex.cli.main import main

pytestmark = pytest.mark.slow


def test_all_15_tasks_run_end_to_end_on_their_mirrors(tmp_path, monkeypatch, capsys):
    from benchmarks.tiny import build_tiny_vlm_checkpoints

    monkeypatch.chdir(tmp_path)  # no task may write its side files outside its result folder
    (ckpt,) = build_tiny_vlm_checkpoints(tmp_path / "tiny", seeds=(0,))
    cache = tmp_path / "mirror15"
    assert main(["eval", "mirror", "--suite", str(PAPER15), "--out", str(cache), "--rows", "4"]) == 0
    made = last_json(capsys)
    assert list(made) == PAPER15_TASKS and all(t["status"] == "saved" for t in made.values())
    assert made["mme"]["rows"] == {"test": 4} and made["refcoco_bbox_rec_val"]["rows"]["val"] > 4  # exploded

    args = sweep_args(cache, ckpt, tmp_path / "paper15", PAPER15_TASKS)
    assert main(args) == 0
    assert last_json(capsys) == {"done": 15, "skipped": 0, "failed": 0, "elsewhere": 0}
    run = tmp_path / "paper15-mirror"
    pairs = json.loads((run / "sweep.json").read_text())["pairs"]
    assert [p["task"] for p in pairs] == PAPER15_TASKS
    for pair in pairs:
        result = json.loads((Path(pair["result_dir"]) / "result.json").read_text())
        metric = headline(pair["task"])
        values = [v for k, v in result["metrics"].items() if k.split(",")[0] == metric]
        assert len(values) == 1 and isinstance(values[0], float) and math.isfinite(values[0]), (pair["task"], metric)
        assert result["mirror"] is True and pair["key"].startswith("mirror-")
    seed = json.loads((Path(next(p["result_dir"] for p in pairs if p["task"] == "seedbench")) / "result.json")
                      .read_text())
    assert "seed_video,none" in seed["metrics"]  # the 8-frame video questions ran (multi_image=middle)
    assert not Path("submissions").exists()

    assert main(args) == 0  # a rerun recomputes nothing
    assert last_json(capsys) == {"done": 0, "skipped": 15, "failed": 0, "elsewhere": 0}

    assert main(["eval", "report", str(run)]) == 0
    md = (run / "results.md").read_text().splitlines()
    assert md[0].startswith("**MIRROR** — 15 of 15 task(s)")
    table = [line for line in md if line.startswith("| ") and "[MIRROR]" in line]
    assert [r.split(" | ")[0][2:] for r in table] == [f"{t} [MIRROR]" for t in PAPER15_TASKS]
    assert [r.split(" | ")[1] for r in table] == [headline(t) for t in PAPER15_TASKS]
    assert all(r.split(" | ")[2].strip("*") not in ("failed", "") for r in table)
    assert (run / "results.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["eval", "prepare", "--check", str(cache)]) == 0
    assert last_json(capsys) == {t: "ok" for t in PAPER15_TASKS}

    scores = oracle_scores(cache, PAPER15_TASKS)
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(verbosity="ERROR", include_path=str(cache / "tasks"), include_defaults=False)
    for t in PAPER15_TASKS:
        check_perfect(t, scores[t], list(tm.load_task_or_group([t])[t].test_docs()))
