"""scripts/toy/gpu_sd.sh proven on the CPU: the GPU machine is lent rarely and briefly, so the script it runs must
work the first time. Its dry mode (``--cpu``) runs the same code paths at a tiny budget; what it brings back must
rebuild a folder that diffusers' StableDiffusionPipeline loads, with the gate in its recipe."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "toy" / "gpu_sd.sh"


def test_gpu_sd_shell_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


@pytest.mark.slow
def test_gpu_sd_dry_run_brings_back_a_loadable_mini_sd(tmp_path):
    out = tmp_path / "out"
    variants = "a|train.lr=1e-3\nb|train.high_noise_fraction=0.25"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), RUNS=str(tmp_path / "runs"), VARIANTS=variants,
               HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], env=env, capture_output=True, text=True, timeout=900,
                          cwd=REPO, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["a.tgz", "a_unet.safetensors", "b.tgz", "b_unet.safetensors", "log.txt", "summary.json"]
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)  # the device tool's per-file limit
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"a", "b"}
    for row in summary.values():
        assert row["steps"] >= 1 and {"passed", "thresholds", "generated"} <= set(row["gate"])
        assert {"background_accuracy", "shape_accuracy", "cell_accuracy"} <= set(row["gate"]["generated"]["all"])

    # rebuild variant a's folder from what came back, as scripts/toy/README.md says, and load it with stock diffusers
    rebuilt = tmp_path / "rebuilt"
    with tarfile.open(out / "a.tgz") as tar:
        tar.extractall(rebuilt, filter="data")
    folder = rebuilt / "gpu_sd_a"
    shutil.copy(out / "a_unet.safetensors", folder / "unet" / "diffusion_pytorch_model.safetensors")
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["config"]["train"]["lr"] == 1e-3 and recipe["config"]["train"]["device"] == "cpu"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    image = pipe("a red circle on a gray background", num_inference_steps=2, height=64, width=64,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3)
