"""scripts/toy/conditioning_loss.py: the per-timestep-band denoising loss is paired (every conditioning sees the
same noise and timesteps) and lands in the band it was drawn from."""
from __future__ import annotations

import runpy
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
band_losses = runpy.run_path(str(REPO / "scripts" / "toy" / "conditioning_loss.py"))["band_losses"]


def _alpha(t, like):
    return (1 - t.float() / 1000).view(-1, *[1] * (like.dim() - 1))


class _Scheduler:
    def add_noise(self, x0, noise, t):
        return _alpha(t, x0) * x0 + (1 - _alpha(t, x0)) * noise


class _Decoder:
    """Predicts ε of known clean images: "oracle" recovers it exactly, "half" gives half of it, "empty" zeros.
    Records every (x_t, t) it was asked about, per conditioning."""

    def __init__(self, x0):
        self.x0, self.scheduler, self.seen = x0, _Scheduler(), {}

    def target(self, x0, noise, t):
        return noise

    def predict(self, x_t, t, cond):
        self.seen.setdefault(cond, []).append((x_t.clone(), t.clone()))
        noise = (x_t - _alpha(t, x_t) * self.x0) / (1 - _alpha(t, x_t))
        return {"oracle": noise, "half": noise / 2, "empty": torch.zeros_like(noise)}[cond]


def test_band_losses_are_paired_and_ordered():
    x0 = torch.randn(6, 4, 8, 8)
    dec = _Decoder(x0)
    conds = {"empty": "empty", "oracle": "oracle", "half": "half"}
    bands = [(0, 500), (500, 1000)]
    table = band_losses(dec, x0, conds, bands, repeats=3, seed=0)

    assert set(table) == {"empty", "oracle", "half"} and list(table["empty"]) == ["0-500", "500-1000"]
    for band in ("0-500", "500-1000"):
        assert table["oracle"][band] < 1e-4
        # E[(ε/2)²] = E[ε²]/4 on the very same draws
        assert abs(table["half"][band] - table["empty"][band] / 4) < 1e-3
        assert 0.8 < table["empty"][band] < 1.2
    # paired: every conditioning saw the same noisy inputs and timesteps, draw for draw
    for other in ("oracle", "half"):
        for (xa, ta), (xb, tb) in zip(dec.seen["empty"], dec.seen[other], strict=True):
            assert torch.equal(xa, xb) and torch.equal(ta, tb)
    # each band's timesteps come from that band
    ts = [t for _, t in dec.seen["empty"]]
    assert all(((t >= 0) & (t < 500)).all() for t in ts[:3])
    assert all(((t >= 500) & (t < 1000)).all() for t in ts[3:])
    # the same seed gives the same table, another seed other draws
    assert band_losses(_Decoder(x0), x0, conds, bands, repeats=3, seed=0) == table
    assert band_losses(_Decoder(x0), x0, conds, bands, repeats=3, seed=1) != table
