"""The decoder placement test (toy/placement.py) tells a decoder that draws the object where its caption says
from one that ignores position words, for every prediction type."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from toy.placement import CORNERS, placement_captions, placement_test
from toy.decoder_model import NoiseSpec, build_noise_scheduler

SIZE = 16


class CornerTokenizer:
    """Maps a placement caption to ids whose first entry is its corner's index (4 = no corner named)."""

    model_max_length = 8

    def __call__(self, prompts, **_):
        ids = torch.zeros(len(prompts), self.model_max_length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            found = [k for k, (corner, (col, row)) in enumerate(CORNERS.items())
                     if f"the {corner} " in prompt or f"column {col} row {row} " in prompt]
            ids[i, 0] = found[0] if found else 4
        return SimpleNamespace(input_ids=ids)


class OneHotTextEncoder(nn.Module):
    device = torch.device("cpu")

    def forward(self, input_ids):
        return SimpleNamespace(last_hidden_state=nn.functional.one_hot(input_ids, 5).float())


class BlobUNet(nn.Module):
    """Predicts, for the scheduler's prediction type, an x0 with a red blob in the quadrant the conditioning names
    (``follows_caption``) or always in the centre."""

    def __init__(self, scheduler, follows_caption: bool) -> None:
        super().__init__()
        self.config = SimpleNamespace(sample_size=SIZE, in_channels=3, out_channels=3)
        self.scheduler, self.follows = scheduler, follows_caption
        self.device = torch.device("cpu")

    def forward(self, x, t, encoder_hidden_states):
        corner = encoder_hidden_states[:, 0].argmax(-1)
        x0 = torch.full_like(x, 0.0039)  # the gray background in [-1, 1]
        for i, c in enumerate(corner.tolist()):
            row, col = ((c // 2) * SIZE // 2, (c % 2) * SIZE // 2) if self.follows else (SIZE // 4, SIZE // 4)
            x0[i, :, row + 2:row + 6, col + 2:col + 6] = torch.tensor([0.7, -0.7, -0.7]).view(3, 1, 1)
        ab = self.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if kind == "v_prediction":
            return (ab.sqrt() * x - x0) / (1 - ab).sqrt()
        return x0

    def __call__(self, x, t, encoder_hidden_states=None):
        return SimpleNamespace(sample=self.forward(x, t, encoder_hidden_states))


def test_captions_name_each_corner_in_both_granularities():
    captions = placement_captions()
    assert captions["coarse"]["top right"] == "a large red circle at the top right on a gray background"
    assert captions["fine"]["bottom left"] == "a large red circle in column 1 row 5 on a gray background"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_decoder_that_places_scores_1_and_one_that_ignores_position_scores_0(prediction_type):
    scheduler = build_noise_scheduler(NoiseSpec(prediction_type="v_prediction"))
    scheduler.register_to_config(prediction_type=prediction_type)
    tok, te = CornerTokenizer(), OneHotTextEncoder()
    placing = placement_test(BlobUNet(scheduler, True), te, tok, scheduler, n_noise=4)
    ignoring = placement_test(BlobUNet(scheduler, False), te, tok, scheduler, n_noise=4)
    for granularity in ("coarse", "fine"):
        assert placing[granularity]["hit_rate"] == 1.0 and placing[granularity]["shift"] > 0.4
        assert placing[granularity]["timestep"] == 792  # the noisiest step with alpha_bar >= 0.1 (cosine)
        # the ignoring decoder puts everything top-left: one lucky corner, and no shift between opposite corners
        assert ignoring[granularity]["hit_rate"] == 0.25 and ignoring[granularity]["shift"] < 1e-4


def test_the_read_out_timestep_follows_the_signal_share_asked_for():
    scheduler = build_noise_scheduler(NoiseSpec(prediction_type="v_prediction"))
    tok, te = CornerTokenizer(), OneHotTextEncoder()
    steps = [placement_test(BlobUNet(scheduler, True), te, tok, scheduler, n_noise=2, min_alpha_bar=a)["coarse"]
             for a in (0.5, 0.1, 0.001)]
    assert [s["timestep"] for s in steps] == sorted(s["timestep"] for s in steps) and steps[0]["timestep"] < 792
    alphas = scheduler.alphas_cumprod
    for a, s in zip((0.5, 0.1, 0.001), steps):
        assert alphas[s["timestep"]] >= a > alphas[s["timestep"] + 1]
    assert all(s["hit_rate"] == 1.0 for s in steps)  # the blob decoder places at every noise level
