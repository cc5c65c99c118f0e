"""The caption-attribute and swap-margin losses that make every padded text-encoder slot carry the caption
(toy/caption_attributes.py), and the text-encoder pretraining that uses them."""
from pathlib import Path

import pytest
import torch

from toy.scenes import world
from toy.caption_attributes import (
    MAX_OBJECTS,
    AttributeHead,
    attribute_loss,
    first_eos_index,
    relative_change,
    scene_targets,
    swap_margin_loss,
)
from toy.recipe import heldout_scenes


def test_scene_targets_hold_each_object_in_caption_order():
    scenes = heldout_scenes(0, 6)
    t = scene_targets(scenes)
    assert t["centre"].shape == (6, MAX_OBJECTS, 2) and t["colour"].shape == (6, MAX_OBJECTS)
    for i, scene in enumerate(scenes):
        n = len(scene.objects)
        assert t["present"][i].tolist() == [1.0] * n + [0.0] * (MAX_OBJECTS - n)
        assert (t["colour"][i, n:] == -100).all() and (t["shape"][i, n:] == -100).all()
        first = scene.objects[0]
        assert t["centre"][i, 0].tolist() == pytest.approx([first.cx, first.cy])
        assert list(world.OBJECT_COLOURS)[int(t["colour"][i, 0])] == first.colour


def test_first_eos_index_is_the_caption_length_plus_bos():
    from toy.tokenizer import load_toy_tokenizer

    tok = load_toy_tokenizer(Path(__file__).resolve().parents[1] / "assets" / "toy" / "tokenizer")
    texts = ["a large red circle at the top left on a gray background", "a"]
    n_words = [len(tok(t).input_ids) - 2 for t in texts]  # without BOS and EOS
    assert first_eos_index(tok, texts).tolist() == [n + 1 for n in n_words]


def test_attribute_loss_reads_only_the_slots_that_have_seen_the_whole_caption():
    torch.manual_seed(0)
    scenes = heldout_scenes(0, 4)
    targets = scene_targets(scenes)
    head = AttributeHead(16)
    hidden = torch.randn(4, 10, 16)
    eos = torch.tensor([3, 5, 9, 2])
    loss, parts = attribute_loss(head, hidden, eos, targets)
    assert set(parts) == {"background", "present", "colour", "shape", "centre", "size"}

    before = hidden.clone()
    for i, e in enumerate(eos):
        before[i, :e] = torch.randn(int(e), 16)  # the word slots: not read
    assert torch.allclose(attribute_loss(head, before, eos, targets)[0], loss)
    after = hidden.clone()
    after[2, 9] += 5.0  # a slot at/after EOS: read
    assert not torch.allclose(attribute_loss(head, after, eos, targets)[0], loss)


def test_attribute_loss_is_learnable_to_near_zero_for_categories():
    """A head on slots that encode the scene exactly drives the categorical parts down: the targets line up."""
    torch.manual_seed(0)
    scenes = heldout_scenes(1, 32)
    t = scene_targets(scenes)
    code = torch.cat([torch.nn.functional.one_hot(t["background"], 5).float(), t["present"],
                      torch.nn.functional.one_hot(t["colour"].clamp_min(0), 8).flatten(1).float(),
                      torch.nn.functional.one_hot(t["shape"].clamp_min(0), 4).flatten(1).float(),
                      t["centre"].flatten(1), t["size"]], dim=1)
    hidden = code[:, None, :].expand(-1, 6, -1).contiguous()
    head = AttributeHead(code.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    eos = torch.full((32,), 2)
    first = attribute_loss(head, hidden, eos, t)[1]
    for _ in range(300):
        loss, parts = attribute_loss(head, hidden, eos, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["background"] < 0.05 and parts["colour"] < 0.05 and parts["shape"] < 0.05
    assert parts["centre"] < first["centre"] / 5


def test_swap_margin_is_a_hinge_on_the_relative_change():
    a = torch.ones(3, 4, 2)
    far = a * 3.0  # relative change 2.0 on every slot
    assert relative_change(a, far).tolist() == pytest.approx([2.0] * 3)
    assert float(swap_margin_loss(a, far, 0.5)) == 0.0
    assert float(swap_margin_loss(a, a.clone(), 0.5)) == pytest.approx(0.5)
    near = a.clone().requires_grad_(True)
    swap_margin_loss(a, near + 0.1, 0.5).backward()
    assert near.grad.abs().sum() > 0
