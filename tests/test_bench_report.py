"""`vilex eval report`: CSV rows, markdown table (bold best, deltas vs baseline), PNG plot."""
import csv
import json

import pytest

from vilex.cli.main import main
from vilex.errors import UserError


def _fake_run(run, scores):
    """A sweep output dir: scores = {(model, task): value or None (failed)}; caption headline is cider."""
    pairs = []
    for (model, task), value in scores.items():
        rdir = run / "results" / model / task / "k"
        if value is None:
            pairs.append({"model": model, "task": task, "status": "failed", "result_dir": str(rdir),
                          "error": "RuntimeError: out of memory"})
            continue
        rdir.mkdir(parents=True)
        metric = "cider" if task == "cap" else "exact_match"
        (rdir / "result.json").write_text(json.dumps({
            "metrics": {"alias": task, "exact_match,none": 0.0, f"{metric},none": value,
                        f"{metric}_stderr,none": "N/A"},
            "config": {"metric_list": [{"metric": metric}, {"metric": "exact_match"}]}}))
        pairs.append({"model": model, "task": task, "status": "done", "result_dir": str(rdir), "error": None})
    (run / "sweep.json").write_text(json.dumps({"config": {"baseline": "siglip"}, "pairs": pairs}))


def test_report_files(tmp_path, capsys):
    _fake_run(tmp_path, {("siglip", "colour"): 0.5, ("siglip", "cap"): 1.25, ("vilex", "colour"): 0.75,
                         ("vilex", "cap"): None})
    assert main(["eval", "report", str(tmp_path)]) == 0
    paths = json.loads(capsys.readouterr().out)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["task"], r["metric"], r["status"]) for r in rows] == [
        ("siglip", "colour", "exact_match", "done"), ("siglip", "cap", "cider", "done"),
        ("vilex", "colour", "exact_match", "done"), ("vilex", "cap", "", "failed")]
    assert float(rows[2]["score"]) == 0.75 and rows[3]["error"] == "RuntimeError: out of memory"
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| task | metric | siglip | vilex | Δ vilex vs siglip |"
    assert md[2] == "| colour | exact_match | 0.5 | **0.75** | +0.25 |"
    assert md[3] == "| cap | cider | **1.25** | failed | failed |"
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_baseline_override_and_errors(tmp_path):
    from benchmarks.report import write_report

    _fake_run(tmp_path, {("siglip", "colour"): 0.5, ("vilex", "colour"): 0.25})
    write_report(tmp_path, baseline="vilex")
    assert (tmp_path / "results.md").read_text().splitlines()[2] == "| colour | exact_match | **0.5** | 0.25 | +0.25 |"
    with pytest.raises(UserError, match=r"baseline 'nope' is not a model of this sweep: \['siglip', 'vilex'\]"):
        write_report(tmp_path, baseline="nope")
    with pytest.raises(UserError, match="no sweep.json"):
        write_report(tmp_path / "empty")
