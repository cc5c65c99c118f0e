"""The shared run loop as stage 1 and stage 2 use it: explicit trainable modules, ``max_minutes`` (checkpoint, stop,
resume to the same losses), the training log, and the refusal to resume against other frozen-input weights."""
import dataclasses
import json
import shutil

import pytest
import torch
from pretrain_helpers import TINY_CONFIG, build_tiny_world, overrides

from vilex.config import load_config
from vilex.errors import RunMismatchError
from vilex.train.config import PretrainConfig
from vilex.train.loop import Pretrainer
from vilex.train.run_loop import loss_curve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pixel_world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("loop_world"), decoder="pixel_unet", n=16)


def _trainer(world, out, *extra):
    cfg = load_config(PretrainConfig, TINY_CONFIG, overrides(world, out, "val.every=1000", "log.tensorboard=false",
                                                             *extra, decoder="pixel_unet"))
    trainer = Pretrainer(cfg, resume="auto")
    trainer.setup()
    return trainer


def test_trainable_pooler_only_freezes_the_vit(pixel_world, tmp_path):
    trainer = _trainer(pixel_world, tmp_path, "train.max_steps=3", "train.trainable=[pooler]")
    vit_before = {k: v.clone() for k, v in trainer.encoder.vit.state_dict().items()}
    pooler_before = {k: v.clone() for k, v in trainer.encoder.pooler.state_dict().items()}
    trainer.run()
    assert [g["name"] for g in trainer.strategy.optimizer.param_groups] == ["pooler"]
    assert all(torch.equal(vit_before[k], v) for k, v in trainer.encoder.vit.state_dict().items())
    assert any(not torch.equal(pooler_before[k], v) for k, v in trainer.encoder.pooler.state_dict().items())
    assert not any(p.requires_grad for p in trainer.encoder.vit.parameters())


def test_max_minutes_checkpoints_stops_and_resumes_to_the_same_losses(pixel_world, tmp_path):
    full = _trainer(pixel_world, tmp_path / "full", "train.max_steps=4").run()
    cut = _trainer(pixel_world, tmp_path / "cut", "train.max_steps=4", "train.max_minutes=1e-9",
                   "train.log_every=1").run()
    assert cut["stopped_early"] and cut["steps"] == 1
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    rest = _trainer(pixel_world, tmp_path / "cut", "train.max_steps=4", "train.log_every=1").run()
    assert rest["steps"] == 4 and not rest["stopped_early"]
    assert rest["losses"] == full["losses"]
    history = json.loads((tmp_path / "cut" / "run_history.json").read_text())
    assert [(h["from_step"], h["to_step"], h["stopped_early"]) for h in history] == [(0, 1, True), (1, 4, False)]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == full["losses"]


def test_stage1_resume_refuses_a_decoder_whose_weights_changed(pixel_world, tmp_path):
    decoder = tmp_path / "decoder"
    shutil.copytree(pixel_world / "decoder", decoder)
    _trainer(pixel_world, tmp_path / "run", "train.max_steps=1", f"model.decoder.name_or_path={decoder}").run()
    weights = next(p for p in decoder.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # a retrained asset under the same path
    weights.write_bytes(bytes(data))
    with pytest.raises(RunMismatchError, match="frozen_decoder_weights"):
        _trainer(pixel_world, tmp_path / "run", "train.max_steps=2", f"model.decoder.name_or_path={decoder}")


def test_stage2_resume_refuses_a_tower_whose_weights_changed(tmp_path):
    from vlm.tiny import build_tiny_world as build_vlm_world
    from vlm.train import train_vlm

    world = build_vlm_world(tmp_path / "world")
    cfg = world.config(tmp_path / "runs")
    cfg = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, max_steps=1))
    first = train_vlm(cfg, "align")
    state = json.loads((cfg.stage_dir("align") / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["tower_weights"] and state["llm_weights"] and state["stage"] == "align"
    assert first["steps"] == 1
    weights = next(p for p in world.siglip.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    longer = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, max_steps=2))
    with pytest.raises(RunMismatchError, match="tower_weights"):
        train_vlm(longer, "align", resume="auto")


def test_loss_curve_is_the_mean_of_each_log_window():
    losses = [4.0, 2.0, 3.0, 1.0, 5.0]
    assert loss_curve(losses, log_every=2) == [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0},
                                               {"step": 5, "loss": 5.0}]
    assert loss_curve([], log_every=2) == []
