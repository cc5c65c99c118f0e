"""``--dry-run`` builds everything but trains nothing: registry names resolved, every path checked, models built on
the meta device at their real shapes, the effective values printed, every problem listed (exit 2), nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pretrain_helpers import TINY_CONFIG, build_tiny_world, overrides

from vilex.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SD15_CONFIG = REPO / "configs" / "vilex" / "sd15_siglip_so400m.yaml"
VLM_TINY = REPO / "configs" / "vlm" / "tiny.yaml"


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def _dry_run(capsys, *argv: str) -> tuple[int, str]:
    code = main([*argv, "--dry-run"])
    return code, capsys.readouterr().out


def _fact(out: str, label: str) -> str:
    """The value printed for ``label`` (one report line: two spaces, the label padded, two spaces, the value)."""
    for line in out.splitlines():
        if line.startswith(f"  {label} "):
            return line[len(label) + 2:].strip()
    raise AssertionError(f"no '{label}' line in:\n{out}")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("dry_world"))


def test_pretrain_dry_run_prints_the_effective_values_and_writes_nothing(world, tmp_path, capsys):
    out = tmp_path / "run"
    before = _tree(world)
    code, text = _dry_run(capsys, "pretrain", "--config", str(TINY_CONFIG), "--processes", "2", *_sets(
        overrides(world, out, "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=7",
                  "train.ema_decay=0.99")))
    assert code == 0, text
    assert _fact(text, "global batch").startswith("8 images = 2 micro × 2 accumulation × 2 processes")
    assert _fact(text, "steps") == "7 (56 images)"
    assert _fact(text, "decoder resolution").startswith("16² (native")
    assert _fact(text, "model space") == "(4, 8, 8) per image"  # the tiny SD's VAE halves 16 px
    assert _fact(text, "views") == "encoder 16² crop, decoder 16² crop"
    assert _fact(text, "ViLex tokens").startswith("8 × 32")
    assert _fact(text, "optimizer group vit").startswith("lr 0.0001, ")
    assert _fact(text, "optimizer group pooler").startswith("lr 0.001, ")
    assert "48 images" not in text and _fact(text, "data.train").endswith("images")
    assert "pipeline/ holds the ema weights" in _fact(text, "checkpoints")
    assert not out.exists() and _tree(world) == before  # no output folder, no latent cache, no lock


def test_pretrain_dry_run_lists_every_problem(world, tmp_path, capsys):
    code, text = _dry_run(capsys, "pretrain", "--config", str(TINY_CONFIG), *_sets(overrides(
        world, tmp_path / "run", "model.vit.init=null", f"model.vit.name_or_path={tmp_path / 'no' / 'vit'}",
        f"data.train.path={tmp_path / 'no_images'}", "train.global_batch_size=6", "train.micro_batch_size=4")))
    assert code == 2
    problems = text.split("problem(s); the run would stop:")[1]
    assert "vision tower (siglip): folder not found" in problems and str(tmp_path / "no" / "vit") in problems
    assert str(tmp_path / "no_images") in problems
    assert "train.global_batch_size 6 is not a multiple of micro_batch_size x processes = 4 x 1" in problems
    assert _fact(text, "decoder resolution")  # the decoder still checked (and shown) despite the other problems


def test_an_unknown_decoder_type_is_named(world, tmp_path, capsys):
    code, text = _dry_run(capsys, "pretrain", "--config", str(TINY_CONFIG),
                          *_sets(overrides(world, tmp_path / "run", "model.decoder.type=sdxl_turbo")))
    err = capsys.readouterr().err
    assert code == 2
    assert "sdxl_turbo" in text + err and "stable_diffusion" in text + err


def test_a_resolution_the_decoder_cannot_take_is_a_problem(world, tmp_path, capsys):
    code, text = _dry_run(capsys, "pretrain", "--config", str(TINY_CONFIG),
                          *_sets(overrides(world, tmp_path / "run", "model.decoder.resolution=18")))
    assert code == 2 and "model.decoder.resolution: 18 is not a multiple of 4" in text
    code, text = _dry_run(capsys, "pretrain", "--config", str(TINY_CONFIG),
                          *_sets(overrides(world, tmp_path / "run", "model.decoder.resolution=24")))
    assert code == 0, text
    assert _fact(text, "decoder resolution").startswith("24² (model.decoder.resolution; native 16")
    assert _fact(text, "model space") == "(4, 12, 12) per image"
    assert _fact(text, "views") == "encoder 16² crop, decoder 24² crop"


@pytest.fixture(scope="module")
def sd15_configs_only(world, tmp_path_factory):
    """SD 1.5 and SigLIP-so400m folders holding their real configs and NO weights: only a dry run can build them."""
    from transformers import CLIPTokenizer, SiglipVisionConfig

    from vilex.models.reference_archs import REFERENCE_ARCHS, save_config_only

    root = tmp_path_factory.mktemp("configs_only")
    sd = root / "sd15"
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(world / "decoder" / part, sd / part)
    # the tiny decoder's tokenizer stands in for SD's (its vocabulary must match the text encoder's)
    save_config_only("stable-diffusion-v1-5/stable-diffusion-v1-5", sd,
                     vocab_size=len(CLIPTokenizer.from_pretrained(sd / "tokenizer")))
    SiglipVisionConfig(**REFERENCE_ARCHS["google/siglip-so400m-patch14-224"]["vision"]).save_pretrained(root / "siglip")
    return root


def test_real_scale_shapes_on_the_meta_device(world, sd15_configs_only, tmp_path, capsys):
    root = sd15_configs_only
    code, text = _dry_run(capsys, "pretrain", "--config", str(SD15_CONFIG), "--processes", "64", *_sets([
        f"model.decoder.name_or_path={root / 'sd15'}", f"model.vit.name_or_path={root / 'siglip'}",
        "model.decoder.resolution=256", "data.train.type=folder", f"data.train.path={world / 'data' / 'train'}",
        f"train.output_dir={tmp_path / 'run'}", f"latent_cache.dir={tmp_path / 'cache'}"]))
    assert code == 0, text
    assert _fact(text, "decoder resolution").startswith("256² (model.decoder.resolution; native 512")
    assert _fact(text, "model space") == "(4, 32, 32) per image"
    assert _fact(text, "views") == "encoder 224² crop, decoder 256² crop"
    assert _fact(text, "ViLex tokens").startswith("75 × 768")
    assert "width 1152" in _fact(text, "vision tower")
    assert _fact(text, "global batch").startswith("2048 images = 32 micro × 1 accumulation × 64 processes")
    vit_params = int(_fact(text, "optimizer group vit").split(", ")[1].split()[0].replace(",", ""))
    assert 350e6 < vit_params < 450e6  # SigLIP-so400m's trainable blocks (~400 M)
    # 512 px is the native size; 260 is not a multiple of the VAE x UNet downsampling (8 x 8)
    code, text = _dry_run(capsys, "pretrain", "--config", str(SD15_CONFIG), *_sets([
        f"model.decoder.name_or_path={root / 'sd15'}", f"model.vit.name_or_path={root / 'siglip'}",
        "model.decoder.resolution=260", "data.train.type=folder", f"data.train.path={world / 'data' / 'train'}"]))
    assert code == 2 and "model.decoder.resolution: 260 is not a multiple of 64" in text


@pytest.fixture(scope="module")
def vlm_world(tmp_path_factory):
    from vlm.tiny import build_tiny_world as build_vlm_world

    return build_vlm_world(tmp_path_factory.mktemp("dry_vlm"))


def test_vlm_dry_run(vlm_world, tmp_path, capsys):
    sets = _sets(vlm_world.overrides(tmp_path / "vlm", "vilex_tokens"))
    code, text = _dry_run(capsys, "train-vlm", "--config", str(VLM_TINY), "--stage", "align", "--processes", "2",
                          *sets)
    assert code == 0, text
    assert _fact(text, "global batch").startswith("4 samples = 2 micro × 1 accumulation × 2 processes")
    assert _fact(text, "steps").startswith("4 = 4 per epoch × 1 epoch")
    assert "16 of 16 looked up exist" in _fact(text, "images")
    assert _fact(text, "optimizer group projector").startswith("lr 0.001, ")
    assert "optimizer group llm" not in text  # align trains the projector only
    assert not (tmp_path / "vlm").exists()

    # instruct before align ran: it would start from nothing; a missing LLM; missing images above the bound
    shutil.copytree(vlm_world.instruct, tmp_path / "instruct")
    records = json.loads((tmp_path / "instruct" / "data.json").read_text())
    missing = next(r["image"] for r in records if r.get("image"))
    (tmp_path / "instruct" / missing).unlink()
    code, text = _dry_run(capsys, "train-vlm", "--config", str(VLM_TINY), "--stage", "instruct", *sets, *_sets([
        f"model.llm.name_or_path={tmp_path / 'no_llm'}", f"instruct.data.image_root={tmp_path / 'instruct'}",
        f"instruct.data.json={tmp_path / 'instruct' / 'data.json'}"]))
    assert code == 2
    problems = text.split("problem(s); the run would stop:")[1]
    assert "instruct.init_from is 'previous' but stage 'align' has no checkpoint" in problems
    assert str(tmp_path / "no_llm") in problems
    assert "1 of 12 image files looked up are missing" in problems and "max_bad_fraction 0.001" in problems
