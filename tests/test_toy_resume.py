"""Every toy stage-0 trainer resumes exactly: a run stopped by ``max_minutes`` after its first step and resumed with
``--resume auto`` ends with the same per-step losses and the same weights as an uninterrupted run."""
from pathlib import Path

import pytest
import torch

from vilex.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory, toy_tokenizer):
    from toy.pretrain_siglip import SiglipPretrainConfig, pretrain_siglip

    root = tmp_path_factory.mktemp("siglip")
    cfg = load_config(SiglipPretrainConfig, REPO / "configs/toy/siglip.yaml", [*_siglip_sets(toy_tokenizer),
                                                                              f"work_dir={root / 'work'}"])
    pretrain_siglip(cfg, root / "siglip")
    return root / "siglip"


def _siglip_sets(tokenizer):
    return [f"tokenizer={tokenizer}", "train.global_batch_size=6", "train.num_workers=0", "vision.width=32",
            "vision.layers=1", "vision.image_size=16", "text.width=32", "text.layers=1", "eval_scenes=8"]


def _trainer(name, tokenizer, siglip, work, *extra):
    """(trainer instance) for one of the stage-0 trainers, tiny, writing checkpoints under ``work``."""
    common = [f"work_dir={work}", f"train.max_steps={STEPS}", "train.log_every=1", "train.warmup_steps=1", *extra]
    if name == "probe":
        from toy.probe import ProbeConfig, ProbeTrainer

        return ProbeTrainer(load_config(ProbeConfig, REPO / "configs/toy/probe.yaml", [
            "train.global_batch_size=4", "train.num_workers=0", "model.channels=[8,16]", "model.hidden=16",
            "model.image_size=16", *common]))
    if name == "siglip":
        from toy.pretrain_siglip import SiglipPretrainConfig, SiglipTrainer

        return SiglipTrainer(load_config(SiglipPretrainConfig, REPO / "configs/toy/siglip.yaml",
                                         [*_siglip_sets(tokenizer), *common]))
    if name == "text_encoder":
        from toy.pretrain_text_encoder import TextEncoderPretrainConfig, TextEncoderTrainer

        return TextEncoderTrainer(load_config(TextEncoderPretrainConfig, REPO / "configs/toy/text_encoder.yaml", [
            f"tokenizer={tokenizer}", f"image_tower={siglip}", "text_encoder.pretrained=null",
            "text_encoder.width=32", "text_encoder.layers=1", "train.global_batch_size=6", "train.num_workers=0", *common]))
    if name == "decoder":
        from toy.pretrain_decoder import DecoderPretrainConfig, DecoderTrainer

        return DecoderTrainer(load_config(DecoderPretrainConfig, REPO / "configs/toy/decoder.yaml", [
            f"tokenizer={tokenizer}", "init_unet=null", "text_encoder.pretrained=null", "text_encoder.width=32",
            "text_encoder.layers=1", "unet.block_out_channels=[16,16]", "unet.norm_num_groups=8",
            "unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
            "unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]", "image_size=16", "train.global_batch_size=4",
            "train.num_workers=0", "gate.enabled=false", *common]))
    from toy.pretrain_llm import LLMPretrainConfig, LLMTrainer

    return LLMTrainer(load_config(LLMPretrainConfig, REPO / "configs/toy/llm.yaml", [
        "model.width=32", "model.layers=1", "model.heads=2", "model.kv_heads=1", "model.intermediate=64",
        "tokenizer.corpus_steps=4", "train.global_batch_size=6", "train.pack_length=256", *common]),
        work.parent / f"{work.name}_tokenizer")


@pytest.mark.parametrize("name", ["probe", "siglip", "text_encoder", "decoder", "llm"])
def test_stage0_trainer_resumes_to_the_uninterrupted_run(name, toy_tokenizer, tiny_siglip, tmp_path):
    full = _trainer(name, toy_tokenizer, tiny_siglip, tmp_path / "full")
    whole = full.train()

    first = _trainer(name, toy_tokenizer, tiny_siglip, tmp_path / "cut", "train.max_minutes=1e-9")
    cut = first.train()
    assert cut["stopped_early"] and cut["steps"] == 1
    second = _trainer(name, toy_tokenizer, tiny_siglip, tmp_path / "cut")
    rest = second.train(resume="auto")
    assert second.loop.resumed_from.name == "checkpoint-1"
    assert rest["steps"] == STEPS and not rest["stopped_early"]
    assert rest["losses"] == whole["losses"]
    a, b = full.module.state_dict(), second.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["from_step"] for r in rest["run_history"]] == [0, 1]
