"""The shipped VLM configs load, validate and say what their names claim (LLaVA-1.5 recipe); the real-scale model
shapes are checked on the meta device (no weights, nothing downloaded)."""

import pytest
import torch
from pretrain_helpers import REPO

from vilex.cli.main import main as vilex_main
from vilex.config import load_config
from vilex.train.strategy import fill_deepspeed_config
from vlm.config import VLMConfig
from vlm.projector import build_projectors
from vlm.towers import VLM_TOWERS, SiglipPatchTower

REAL = ["qwen2.5-7b_siglip-so400m.yaml", "qwen2.5-7b_vilex.yaml", "qwen2.5-7b_vilex-tokens.yaml"]


@pytest.mark.parametrize("name", REAL)
def test_real_scale_configs_follow_the_llava_recipe(name, capsys):
    cfg = load_config(VLMConfig, REPO / "configs" / "vlm" / name)
    assert cfg.model.llm.name_or_path == "Qwen/Qwen2.5-7B-Instruct" and cfg.model.projector.type == "mlp2x_gelu"
    assert cfg.model.tower.type == {"qwen2.5-7b_siglip-so400m.yaml": "siglip", "qwen2.5-7b_vilex.yaml": "vilex",
                                    "qwen2.5-7b_vilex-tokens.yaml": "vilex_tokens"}[name]
    assert cfg.model.tower.type in VLM_TOWERS and cfg.model.tower.feature_layer == -2
    if cfg.model.tower.type == "siglip":
        assert cfg.model.tower.name_or_path == "google/siglip-so400m-patch14-224"
    a, i = cfg.align, cfg.instruct
    assert (a.lr, a.global_batch_size, i.lr, i.global_batch_size) == (1e-3, 256, 2e-5, 128)
    assert (a.data.template, i.data.template, i.init_from, cfg.full) == ("align", "instruct", "previous", None)
    for stage, zero in ((a, 2), (i, 3)):
        assert stage.strategy == "deepspeed" and stage.precision == "bf16"
        ds = fill_deepspeed_config(REPO / stage.deepspeed_config, stage.micro_batch_size,
                                   stage.global_batch_size // (stage.micro_batch_size * 8), 8, stage.grad_clip,
                                   stage.precision, {"betas": stage.betas, "eps": stage.eps,
                                                     "weight_decay": stage.weight_decay})
        assert ds["zero_optimization"]["stage"] == zero and ds["train_batch_size"] == stage.global_batch_size
    assert cfg.output_dir.name == name.removesuffix(".yaml")
    # nothing real is here: the dry run names each missing input and still plans the batch for 8 GPUs
    assert vilex_main(["train-vlm", "--config", str(REPO / "configs" / "vlm" / name), "--stage", "instruct",
                       "--dry-run", "--processes", "8"]) == 2
    out = capsys.readouterr().out
    assert "128 samples = 16 micro × 1 accumulation × 8 processes" in out
    problems = out.split("problem(s); the run would stop:")[1]
    assert "Qwen/Qwen2.5-7B-Instruct' is neither a local folder nor a model in the local Hugging Face cache" in problems
    assert "conversation file not found: data/llava/" in problems


def test_real_scale_shapes_on_meta_device():
    """SigLIP so400m/14@224 + Qwen2.5-7B: 256 image tokens of width 1152 projected to 3584, penultimate layer valid."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        vit = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                   num_attention_heads=16, patch_size=14, image_size=224))
        llm = Qwen2ForCausalLM(Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                           num_attention_heads=28, num_key_value_heads=4, vocab_size=152064))
        tower = SiglipPatchTower(vit, feature_layer=-2)
        projectors = build_projectors("mlp2x_gelu", tower.feature_groups, llm.config.hidden_size)
        feats = tower(torch.empty(2, 3, 224, 224, device="meta"))["patch"]
        out = projectors["patch"](feats)
    assert tower.num_image_tokens == 256 and feats.shape == (2, 256, 1152) and out.shape == (2, 256, 3584)
    assert sum(p.numel() for p in projectors.parameters()) == 1152 * 3584 + 3584 + 3584 * 3584 + 3584


def test_tiny_config_loads_and_dry_runs(capsys):
    cfg = load_config(VLMConfig, REPO / "configs" / "vlm" / "tiny.yaml")
    assert (cfg.align.precision, cfg.align.strategy, cfg.align.global_batch_size) == ("fp32", "torch", 4)
    # its inputs are built by vlm/tiny.py (tests/test_dry_run.py dry-runs it on them): here they are missing
    assert vilex_main(["train-vlm", "--config", str(REPO / "configs" / "vlm" / "tiny.yaml"), "--stage", "align",
                       "--dry-run", "--set", "align.lr=0.5"]) == 2
    out = capsys.readouterr().out
    assert "2 samples" not in out and "runs/tiny-vlm/align/data.json" in out


def test_the_stage_names_have_one_definition():
    """STAGE_TRAINS (vlm/config.py) is the one list of stages: their order, the CLI's --stage choices, and the
    trainable defaults that vlm.model re-exports; every stage is a section of VLMConfig."""
    import argparse
    import dataclasses

    import vlm.config
    import vlm.model
    from vilex.cli.main import build_parser

    assert vlm.model.STAGE_TRAINS is vlm.config.STAGE_TRAINS
    assert vlm.config.STAGE_ORDER == tuple(vlm.config.STAGE_TRAINS) == ("align", "instruct", "full")
    assert set(vlm.config.STAGE_ORDER) <= {f.name for f in dataclasses.fields(VLMConfig)}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    stage = next(a for a in commands.choices["train-vlm"]._actions if a.dest == "stage")
    assert tuple(stage.choices) == vlm.config.STAGE_ORDER
