"""Every command in benchmarks/README.md's code blocks and in `vilex eval --help` runs here, as written.

The paths in the commands are swapped for a stand-in world (the only edit): a small toy-world split, its toy tasks
(made by the documented `vilex eval toy-tasks` command), a stand-in for paper15.yaml with the shipped toy VLMs as
`siglip` and `vilex` on two toy tasks, and temporary output folders. `EXERCISED` says which test runs each command;
`test_documented_commands_are_exactly_the_exercised_ones` fails when a command is added to the docs (or changed)
without being run here. The fast test runs the planning, multi-GPU and report commands with a stand-in worker
process (tests/test_bench_parallel.py) and 4 pretend GPUs; the slow tests run the others with lmms-eval for real.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_bench_parallel import FAKE_WORKER, records

import benchmarks.sweep as sweep
from benchmarks.cli import EXAMPLES
from vilex.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
TASKS = ["vilex_toy_colour", "vilex_toy_caption"]

# command (as documented) -> the function here that runs it
EXERCISED = {
    "vilex eval toy-tasks --split runs/toy/data/test --out runs/toy/tasks": "world",
    "vilex eval --config configs/benchmarks/paper15.yaml --dry-run": "test_plan_gpus_and_report_commands",
    "vilex eval --config configs/benchmarks/paper15.yaml --set 'devices=[0,1,2,3]'":
        "test_plan_gpus_and_report_commands",
    "vilex eval report runs/bench/paper15 --baseline siglip": "test_plan_gpus_and_report_commands",
    "vilex eval --config configs/benchmarks/paper15.yaml": "test_sweep_and_plugin_commands_for_real",
    "lmms-eval eval --model vilex_vlm --model_args pretrained=assets/toy/vlm/siglip --tasks vilex_toy_colour "
    "--include_path runs/toy/tasks --batch_size 1 --log_samples --output_path runs/bench/by_hand":
        "test_sweep_and_plugin_commands_for_real",
    "vilex export-hf --checkpoint assets/toy/vlm/siglip --out runs/toy/siglip_hf":
        "test_sweep_and_plugin_commands_for_real",
    "lmms-eval eval --model llava_hf --model_args pretrained=runs/toy/siglip_hf,device_map=cpu --device cpu --tasks "
    "vilex_toy_colour --include_path runs/toy/tasks --batch_size 1": "test_sweep_and_plugin_commands_for_real",
    "vilex eval prepare --suite configs/benchmarks/paper15.yaml --cache /data/bench-cache":
        "test_offline_commands_for_real",
    "vilex eval --config configs/benchmarks/paper15.yaml --cache /data/bench-cache": "test_offline_commands_for_real",
    "vilex eval --config configs/benchmarks/paper15.yaml --cache /data/bench-cache --set 'models={mine: CKPT}' "
    "--set 'tasks=[gqa]' --set baseline=null --set output_dir=OUT": "test_offline_commands_for_real",
    "vilex eval mirror --suite configs/benchmarks/paper15.yaml --out runs/bench/mirror15":
        "test_mirror_and_check_commands_for_real",
    "vilex eval --config configs/benchmarks/paper15.yaml --cache runs/bench/mirror15":
        "test_mirror_and_check_commands_for_real",
    "vilex eval report runs/bench/paper15-mirror": "test_mirror_and_check_commands_for_real",
    "vilex eval prepare --check /data/bench-cache": "test_mirror_and_check_commands_for_real",
}


def readme_commands() -> list[str]:
    """`vilex …` / `lmms-eval …` lines of the README's bash blocks, trailing comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("vilex ", "lmms-eval "))]


def help_commands(capsys) -> list[str]:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert EXAMPLES.strip() in text
    return [line.strip() for line in text.splitlines() if line.startswith("  vilex ")]


def test_documented_commands_are_exactly_the_exercised_ones(capsys):
    documented = readme_commands() + help_commands(capsys)
    assert set(help_commands(capsys)) <= set(readme_commands())  # the help repeats the README, nothing new
    assert sorted(set(documented)) == sorted(EXERCISED)
    assert set(EXERCISED.values()) <= set(globals())


def _commands(owner: str) -> list[str]:
    return [cmd for cmd, who in EXERCISED.items() if who == owner]


def _run(cmd: str, subs: dict[str, str]) -> tuple[int, str]:
    """Run a documented command with the stand-in paths; returns (exit code, stdout)."""
    for old, new in subs.items():
        cmd = re.sub(rf"(?<![\w/.-]){re.escape(old)}(?![\w.-])", new, cmd)
    argv = shlex.split(cmd)
    if argv[0] == "vilex":
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(argv[1:])
        return rc, out.getvalue()
    proc = subprocess.run([str(Path(sys.executable).parent / argv[0]), *argv[1:]], capture_output=True, text=True,
                          cwd=ROOT)
    # lmms-eval logs a failed evaluation (to stdout) and still exits 0
    assert proc.returncode == 0 and "Error during evaluation" not in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-3000:]
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy split and the toy tasks made from it by the documented command."""
    from toy.scenes.generate import generate_dataset

    root = tmp_path_factory.mktemp("docs_world")
    generate_dataset(root / "toy", n=8, seed=0, size=32, splits={"train": 0.5, "test": 0.5}, progress=False)
    subs = {"runs/toy/data/test": str(root / "toy" / "test"), "runs/toy/tasks": str(root / "tasks")}
    (cmd,) = _commands("world")
    rc, out = _run(cmd, subs)
    assert rc == 0 and json.loads(out)["vilex_toy_colour"] > 2  # the number of docs of each task
    assert (root / "tasks" / "vilex_toy_colour.yaml").is_file()
    return root


@pytest.fixture
def stand_in(world, tmp_path, monkeypatch):
    """paper15.yaml's stand-in (toy VLMs, two toy tasks, 2 docs each, two CPU workers) and the path substitutions."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = tmp_path / "paper15.yaml"
    cfg.write_text(json.dumps({
        "models": {name: str(ROOT / "assets" / "toy" / "vlm" / name) for name in ("siglip", "vilex")},
        "tasks": TASKS, "include_path": str(world / "tasks"), "output_dir": str(tmp_path / "paper15"),
        "model": "vilex_vlm", "batch_size": 1, "limit": 2, "devices": ["cpu", "cpu"], "process_per": "model",
        "use_cache": True, "baseline": "siglip"}))
    return {"configs/benchmarks/paper15.yaml": str(cfg), "runs/bench/paper15": str(tmp_path / "paper15"),
            "runs/bench/by_hand": str(tmp_path / "by_hand"), "runs/toy/data/test": str(world / "toy" / "test"),
            "runs/toy/tasks": str(world / "tasks"), "runs/toy/siglip_hf": str(tmp_path / "siglip_hf"),
            "/data/bench-cache": str(tmp_path / "cache"), "gqa": "vilex_toy_colour",
            "CKPT": str(ROOT / "assets/toy/vlm/siglip"),
            "OUT": str(tmp_path / "by_hand_prepared"), "assets/toy/vlm/siglip": str(ROOT / "assets/toy/vlm/siglip")}


def test_plan_gpus_and_report_commands(stand_in, tmp_path, monkeypatch):
    dry_run, gpus, report = _commands("test_plan_gpus_and_report_commands")
    rc, out = _run(dry_run, stand_in)
    assert rc == 0 and not (tmp_path / "paper15").exists()
    assert json.loads(out.strip().splitlines()[-1]) == {"pairs": 4, "done": 0, "to_run": 4, "held": 0, "workers": 2,
                                                        "processes": 2}

    # 4 pretend GPUs; the stand-in worker records what each worker process saw
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(sweep, "WORKER_COMMAND", [sys.executable, str(script)])
    monkeypatch.setattr(sweep, "cuda_device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("FAKE_WORKER_RECORD", str(tmp_path / "runs.jsonl"))
    monkeypatch.setenv("FAKE_WORKER_BARRIER", "4")
    rc, out = _run(gpus, stand_in)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {"done": 4, "skipped": 0, "failed": 0,
                                                                    "elsewhere": 0}
    runs = records(tmp_path / "runs.jsonl")  # 2 models on 4 GPUs: each model's tasks in 2 processes, all at once
    assert sorted(r["cuda"] for r in runs) == ["0", "1", "2", "3"] and all(r["met"] for r in runs)
    assert {r["device"] for r in runs} == {"cuda"} and len({r["pid"] for r in runs}) == 4

    rc, out = _run(report, stand_in)
    assert rc == 0
    table = (tmp_path / "paper15" / "results.md").read_text().splitlines()
    assert table[0] == "| task | metric | siglip | vilex | Δ vilex vs siglip |"
    assert table[2:2 + len(TASKS)] == [f"| {t} | exact_match | **0.5** | **0.5** | +0 |" for t in TASKS]  # stand-in
    assert (tmp_path / "paper15" / "results.png").read_bytes()[:4] == b"\x89PNG"


def _samples(folder: Path, task: str) -> dict[int, list]:
    """doc_id -> filtered response, from a sweep result's samples.jsonl or lmms-eval's own samples file."""
    files = [folder / "samples.jsonl"] if (folder / "samples.jsonl").is_file() else \
        sorted(folder.rglob(f"*samples_{task}*.jsonl"))
    assert len(files) == 1, files
    samples = [json.loads(line) for line in files[0].read_text().splitlines()]
    # lmms-eval's own file holds a single filtered response as a string, the sweep's keeps the list
    return {s["doc_id"]: s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            for s in samples}


def _pair_dir(run: Path, model: str, task: str) -> Path:
    pairs = json.loads((run / "sweep.json").read_text())["pairs"]
    return Path(next(p["result_dir"] for p in pairs if p["model"] == model and p["task"] == task))


@pytest.mark.slow
def test_sweep_and_plugin_commands_for_real(stand_in, tmp_path):
    """The stand-in sweep with lmms-eval (two CPU workers at once), then bare lmms-eval with our plugin and with the
    stock llava_hf on an export: the same answers for the same docs."""
    sweep_cmd, by_hand, export, llava = _commands("test_sweep_and_plugin_commands_for_real")
    rc, out = _run(sweep_cmd, stand_in)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {"done": 4, "skipped": 0, "failed": 0,
                                                                    "elsewhere": 0}
    ours = _samples(_pair_dir(tmp_path / "paper15", "siglip", "vilex_toy_colour"), "vilex_toy_colour")
    assert sorted(ours) == [0, 1]  # limit: 2

    _run(by_hand, stand_in)
    bare = _samples(tmp_path / "by_hand", "vilex_toy_colour")
    assert len(bare) > 2 and {d: bare[d] for d in ours} == ours

    assert _run(export, stand_in)[0] == 0
    _, table = _run(llava, stand_in)  # no --log_samples: lmms-eval prints its results table
    (results,) = (tmp_path / "by_hand").rglob("*_results.json")
    ours_em = json.loads(results.read_text())["results"]["vilex_toy_colour"]["exact_match,none"]
    row = next(line for line in table.splitlines() if "vilex_toy_colour" in line and "exact_match" in line)
    cells = [c.strip() for c in row.split("|")]  # |task|version|filter|n-shot|metric|↑|value|±|stderr|
    assert float(cells[cells.index("exact_match") + 2]) == pytest.approx(ours_em, abs=1e-4)


@pytest.mark.slow
def test_offline_commands_for_real(stand_in, tmp_path):
    """prepare, the sweep on the prepared copies, and one prepared task for one checkpoint."""
    prepare, cached_sweep, one_task = _commands("test_offline_commands_for_real")
    rc, out = _run(prepare, stand_in)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {t: "saved" for t in TASKS}
    rc, out = _run(cached_sweep, stand_in)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["done"] == 4
    spec = json.loads((_pair_dir(tmp_path / "paper15", "siglip", "vilex_toy_colour") / "result.json").read_text())
    assert spec["spec"]["offline"] is True
    ours = _samples(_pair_dir(tmp_path / "paper15", "siglip", "vilex_toy_colour"), "vilex_toy_colour")
    rc, out = _run(one_task, stand_in)  # one checkpoint, one prepared task: a 1 x 1 sweep in its own output_dir
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {"done": 1, "skipped": 0, "failed": 0,
                                                                    "elsewhere": 0}
    assert _samples(_pair_dir(tmp_path / "by_hand_prepared", "mine", "vilex_toy_colour"), "vilex_toy_colour") == ours


@pytest.mark.slow
def test_mirror_and_check_commands_for_real(tmp_path, monkeypatch):
    """The mirror of paper15.yaml (its real settings, two of its tasks, the shipped toy VLMs on CPU), the sweep on it,
    its MIRROR-labelled report, and `prepare --check` on the mirror (a prepared cache like any other)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    real = yaml.safe_load((ROOT / "configs" / "benchmarks" / "paper15.yaml").read_text())
    tasks = ["vqav2_val", "scienceqa_img"]
    cfg = tmp_path / "paper15.yaml"
    cfg.write_text(json.dumps({**real, "tasks": tasks, "output_dir": str(tmp_path / "paper15"), "devices": ["cpu"],
                               "models": {m: str(ROOT / "assets" / "toy" / "vlm" / m) for m in ("siglip", "vilex")}}))
    subs = {"configs/benchmarks/paper15.yaml": str(cfg), "runs/bench/mirror15": str(tmp_path / "mirror15"),
            "runs/bench/paper15-mirror": str(tmp_path / "paper15-mirror"),
            "/data/bench-cache": str(tmp_path / "mirror15")}
    mirror, sweep_cmd, report, check = _commands("test_mirror_and_check_commands_for_real")
    rc, out = _run(mirror, subs)
    assert rc == 0 and {t: v["status"] for t, v in json.loads(out.strip().splitlines()[-1]).items()} == \
        {t: "saved" for t in tasks}
    rc, out = _run(sweep_cmd, subs)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {"done": 4, "skipped": 0, "failed": 0,
                                                                    "elsewhere": 0}
    assert not (tmp_path / "paper15").exists()  # the mirror's results went to paper15-mirror
    rc, _ = _run(report, subs)
    table = (tmp_path / "paper15-mirror" / "results.md").read_text().splitlines()
    assert rc == 0 and table[0].startswith("**MIRROR**")
    assert [line.split(" | ")[0][2:] for line in table if "[MIRROR]" in line] == [f"{t} [MIRROR]" for t in tasks]
    rc, out = _run(check, subs)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {t: "ok" for t in tasks}
