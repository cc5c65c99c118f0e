"""One vocabulary of steps and batches across stage 0, 1 and 2; retired keys fail naming the new one; every key a
config shows is read (stage-1 view sizes come from the model, the decoder's from ``model.decoder.resolution``)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from pretrain_helpers import TINY_CONFIG, build_tiny_world, overrides
from safetensors.torch import load_file

from toy.cli import STAGE0_COMMANDS
from vilex.config import load_config
from vilex.errors import ConfigError
from vilex.train.batching import BatchSchedule, plan_batches
from vilex.train.config import PretrainConfig
from vlm.config import VLMConfig

REPO = Path(__file__).resolve().parents[1]
SCHEDULE_KEYS = ["max_steps", "global_batch_size", "micro_batch_size"]


def _config_class(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _trainer_sections():
    """(name, the train-section class) of every trainer: stage 0's toy trainers, stage 1, stage 2."""
    for command in STAGE0_COMMANDS:
        cls = _config_class(command.config)
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        if "train" in hints:
            train = next(f for f in dataclasses.fields(cls) if f.name == "train").default_factory
            yield f"toy {command.name}", type(train())
    yield "pretrain", type(PretrainConfig().train)
    yield "train-vlm", type(VLMConfig().align)


def test_every_trainer_counts_steps_and_batches_with_the_same_keys():
    sections = dict(_trainer_sections())
    assert {"pretrain", "train-vlm", "toy pretrain-decoder", "toy pretrain-llm"} <= set(sections)
    for name, cls in sections.items():
        assert issubclass(cls, BatchSchedule), name
        names = [f.name for f in dataclasses.fields(cls)]
        assert set(SCHEDULE_KEYS) <= set(names), name
        assert not {"steps", "batch_size", "grad_accum"} & set(names), name


@pytest.mark.parametrize("global_, micro, processes, accum, micro_out", [
    (2048, 32, 8, 8, 32), (2048, None, 8, 1, 256), (64, 16, 2, 2, 16), (4, None, 1, 1, 4)])
def test_accumulation_is_derived(global_, micro, processes, accum, micro_out):
    plan = plan_batches(global_, micro, processes)
    assert (plan.grad_accum, plan.micro_batch_size) == (accum, micro_out)
    assert plan.grad_accum * plan.micro_batch_size * processes == global_


def test_a_global_batch_the_processes_do_not_divide_names_the_keys():
    with pytest.raises(ConfigError, match=r"instruct.global_batch_size 100 is not a multiple of micro_batch_size x "
                                          r"processes = 16 x 2"):
        plan_batches(100, 16, 2, where="instruct")
    with pytest.raises(ConfigError, match=r"train.global_batch_size 9 is not divisible by the 2 processes"):
        plan_batches(9, None, 2)


@pytest.mark.parametrize("override, new_key", [
    ("train.grad_accum=8", "set train.global_batch_size"),
    ("train.steps=5", "set train.max_steps"),
    ("data.train.batch_size=8", "set train.global_batch_size"),
    ("data.train.epochs=2", "set train.max_steps"),
    ("data.train.seed=1", "set train.seed"),
    ("data.train.views.decoder.size=256", "model.decoder.resolution"),
    ("data.train.views.encoder.mean=[0,0,0]", "normalisation"),
])
def test_retired_stage1_keys_fail_in_one_line_naming_the_new_key(override, new_key):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, TINY_CONFIG, [override])
    message = str(err.value)
    assert "\n" not in message and "is no longer a key" in message and new_key in message
    assert f"'{override.split('=')[0]}'" in message


def test_retired_keys_of_stage0_and_stage2():
    from toy.pretrain_decoder import DecoderPretrainConfig
    from toy.pretrain_llm import LLMPretrainConfig

    with pytest.raises(ConfigError, match=r"'train.steps' is no longer a key: set train.max_steps"):
        load_config(DecoderPretrainConfig, REPO / "configs" / "toy" / "decoder.yaml", ["train.steps=3"])
    with pytest.raises(ConfigError, match=r"'train.batch_size' is no longer a key: set train.global_batch_size"):
        load_config(DecoderPretrainConfig, REPO / "configs" / "toy" / "decoder.yaml", ["train.batch_size=3"])
    with pytest.raises(ConfigError, match=r"'data.scenes_per_step' is no longer a key: set train.global_batch_size"):
        load_config(LLMPretrainConfig, REPO / "configs" / "toy" / "llm.yaml", ["data.scenes_per_step=3"])
    with pytest.raises(ConfigError, match=r"'instruct.grad_accum' is no longer a key: set instruct.global_batch_size"):
        load_config(VLMConfig, REPO / "configs" / "vlm" / "tiny.yaml", ["instruct.grad_accum=2"])


def test_every_shipped_config_loads_with_the_one_vocabulary():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        text = path.read_text()
        for old in ("grad_accum:", "scenes_per_step:", "\n  steps:", "\n  batch_size:"):
            if old == "\n  batch_size:" and path.name in ("decoder.yaml", "sd.yaml"):  # the quality gate's evaluation batch
                continue
            assert old not in text, (path, old)


def test_stage0_accumulation_splits_each_step_into_micro_batches(tmp_path, toy_tokenizer):
    """With micro < global a step's scenes are the same scenes, in micro-batches (so the data does not depend on
    the micro-batch); a contrastive trainer refuses it."""
    from toy.pretrain_siglip import SiglipPretrainConfig, SiglipTrainer
    from toy.probe import ProbeConfig, ProbeTrainer
    from vilex.train.run_loop import RunState

    def trainer(micro):
        sets = [f"work_dir={tmp_path / str(micro)}", "train.global_batch_size=6", f"train.micro_batch_size={micro}",
                "train.max_steps=2", "train.num_workers=0", "model.channels=[8,16]", "model.hidden=16"]
        return ProbeTrainer(load_config(ProbeConfig, REPO / "configs" / "toy" / "probe.yaml", sets))

    whole, split = trainer("null"), trainer(2)
    assert (whole.strategy.grad_accum, split.strategy.grad_accum) == (1, 3)
    a = list(whole.scene_batches(RunState(), 16, 0))
    b = list(split.scene_batches(RunState(), 16, 0))
    assert len(a) == 2 and len(b) == 6 and [m.part for m in b] == [0, 1, 2] * 2
    for step in range(2):
        parts = [m for m in b if m.step == step]
        assert (torch.as_tensor(a[step].images) == torch.cat([torch.as_tensor(m.images) for m in parts])).all()

    sets = [f"tokenizer={toy_tokenizer}", f"work_dir={tmp_path / 'siglip'}", "train.global_batch_size=6",
            "train.micro_batch_size=3"]
    with pytest.raises(ConfigError, match="whole global batch"):
        SiglipTrainer(load_config(SiglipPretrainConfig, REPO / "configs" / "toy" / "siglip.yaml", sets))


# ----------------------------------------------------------------------------- stage 1: what the config says is what runs
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("vocab_world"), n=24)


def test_decoder_resolution_is_settable_and_checked(world):
    from vilex.models.vilex_model import ViLexModel
    from vilex.train.data import model_views

    cfg = load_config(PretrainConfig, TINY_CONFIG, overrides(world, world / "unused", "model.decoder.resolution=32"))
    model = ViLexModel.from_config(cfg.model)
    assert model.decoder.native_image_size == 16 and model.decoder.image_size == 32
    assert model.decoder.model_space_shape[1:] == (16, 16)  # the VAE's 2x
    assert model_views(model, cfg.data.train)["decoder"].size == 32
    x0 = torch.randn(2, *model.decoder.model_space_shape)
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16), x0)["loss"])

    # the tiny SD: a 2x VAE and a UNet with two resolution levels (2x), so multiples of 4
    bad = load_config(PretrainConfig, TINY_CONFIG, overrides(world, world / "unused", "model.decoder.resolution=18"))
    with pytest.raises(ConfigError, match=r"model.decoder.resolution: 18 is not a multiple of 4 .*e.g. 16 or 20"):
        ViLexModel.from_config(bad.model)


@pytest.mark.parametrize("choice", ["ema", "raw"])
def test_pipeline_holds_the_chosen_encoder_weights(world, tmp_path, choice):
    from vilex.train.loop import pretrain

    out = tmp_path / choice
    cfg = load_config(PretrainConfig, TINY_CONFIG, overrides(
        world, out, "train.max_steps=2", "train.checkpoint_every=2", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.ema_decay=0.5", f"train.pipeline_weights={choice}", "val.every=1000"))
    summary = pretrain(cfg)
    ckpt = Path(summary["checkpoint"])
    assert summary["images_seen"] == 2 * 4  # two steps of the global batch, in micro-batches of 2
    provenance = json.loads((ckpt / "pipeline" / "training.json").read_text())
    assert provenance == {"step": 2, "encoder_weights": choice, "ema_decay": 0.5}
    ema = torch.load(ckpt / "ema.pt", weights_only=True)["shadow"]
    raw = torch.load(ckpt / "encoder.pt", weights_only=True)
    pooler = load_file(str(ckpt / "pipeline" / "pooler" / "diffusion_pytorch_model.safetensors"))
    name = next(n for n in ema if n.startswith("pooler.") and n[len("pooler."):] in pooler)
    saved = pooler[name[len("pooler."):]]
    expected = ema[name] if choice == "ema" else raw[name]
    other = raw[name] if choice == "ema" else ema[name]
    assert torch.equal(saved.float(), expected.float()) and not torch.equal(saved.float(), other.float())
