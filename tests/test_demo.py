"""`vilex demo` end to end (slow): stand-in toy assets trained for a few steps, a reduced budget, and the report's
files and tables checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _vilex(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "vilex", *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_demo_end_to_end_with_stand_in_assets(tmp_path):
    assets = tmp_path / "assets"
    _vilex("toy", "pretrain-decoder", "--config", "configs/toy/decoder.yaml", "--out", str(assets / "decoder"),
           "--set", "train.max_steps=2", "--set", "gate.enabled=false", "--set", f"work_dir={tmp_path / 'dec_work'}",
           "--set", "init_unet=null")  # from scratch: the config's warm start is a run folder of its own recipe
    _vilex("toy", "pretrain-siglip", "--config", "configs/toy/siglip.yaml", "--out", str(assets / "siglip"),
           "--set", "train.max_steps=2", "--set", f"work_dir={tmp_path / 'siglip_work'}")
    _vilex("toy", "train-probe", "--config", "configs/toy/probe.yaml", "--out", str(assets / "probe"),
           "--set", "train.max_steps=2", "--set", "eval_scenes=16", "--set", f"work_dir={tmp_path / 'probe_work'}")
    _vilex("toy", "pretrain-llm", "--config", "configs/toy/llm.yaml", "--out", str(assets / "llm"),
           "--set", "model.width=32", "--set", "model.layers=1", "--set", "model.heads=2", "--set", "model.kv_heads=1",
           "--set", "model.intermediate=64", "--set", "tokenizer.corpus_steps=4", "--set", "train.global_batch_size=6",
           "--set", "train.max_steps=2", "--set", "train.warmup_steps=1", "--set", "eval_scenes=6",
           "--set", "eval_questions=6", "--set", f"work_dir={tmp_path / 'llm_work'}")
    out = tmp_path / "demo"
    _vilex("demo", "--out", str(out), "--n", "120", "--short-steps", "3", "--eval-scenes", "6", "--vlm-steps", "3",
           "--suite-docs", "3", env={"VILEX_TOY_ASSETS": str(assets)})
    report = (out / "report.md").read_text()
    for section in ("## Toy dataset", "## Contact sheet", "## Stage 1: short ViLex run (3 steps)",
                    "## Stage 1 short run: measurements", "## Stage 1: shipped full toy run",
                    "## Stage 2: short toy VLM run", "## Stage 2: toy VLMs on the toy benchmark suite"):
        assert section in report
    for png in ("contact_sheet.png", "short_run_reconstructions.png", "short_run_compose.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in report
    claims = json.loads((out / "short_run_claims.json").read_text())
    assert set(claims["arms"]) == {"caption_coarse", "caption_fine", "vilex_1", "vilex_4", "vilex_16"}
    assert claims["n"] == 6 and set(claims["verdicts"]) >= {"A_psnr_1token_beats_coarse_caption", "B_monotone_psnr"}
    table_rows = [l for l in report.splitlines() if l.startswith("| ViLex, ")]
    assert len(table_rows) == 3 and all(len(r.split("|")) == 12 for r in table_rows)
    # stage 2: the short VLM run (no VLM is shipped in the stand-in assets) on all six toy tasks, via lmms-eval
    # one row per task in the scores table, and again in the CI table beneath it (results.md's own sections)
    suite_rows = [l for l in report.splitlines() if l.startswith("| vilex_toy_")]
    assert len({r.split("|")[1].strip() for r in suite_rows}) == 6 and "siglip_demo_short_run" in report
    assert (out / "toy_suite" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the short run, shipped as the toy ViLex asset would be: pipeline folder + claims + recipe
    shipped = tmp_path / "shipped"
    _vilex("toy", "ship-vilex", "--run", str(out / "vilex_short"), "--out", str(shipped), "--n", "4",
           "--test-split", str(out / "data" / "test"), "--assets", str(assets), "--feature-probe-scenes", "60")
    recipe = json.loads((shipped / "recipe.json").read_text())
    assert recipe["asset"] == "vilex" and recipe["metrics"]["steps_done"] == 3
    assert recipe["metrics"]["claims"]["n"] == 4 and recipe["config"]["train"]["max_steps"] == 3
    assert recipe["metrics"]["last_invocation"]["from_step"] == 0
    assert (shipped / "vilex_config.json").is_file() and "| claim | holds |" in (shipped / "claims.md").read_text()
    # the trained ViT and its initialisation probed on the same 60 + 20 held-out scenes, side by side
    probes = recipe["metrics"]["feature_probe"]
    assert (probes["n_train"], probes["n_test"]) == (60, 20) and set(probes["vilex_vit"]) == set(probes["init_vit"])
    assert all(0 <= probes[t]["count"]["tokens"] <= 1 for t in ("vilex_vit", "init_vit"))
    assert "| target | vilex_vit | init | majority |" in (shipped / "claims.md").read_text()
    assert (shipped / "shipped_reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
