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


class _X0Decoder:
    """Predicts x0 straight from its conditioning (the "tokens" are image-shaped): fitting can reach the target."""

    class scheduler:  # noqa: N801 — the attribute the script reads
        config = type("C", (), {"num_train_timesteps": 1000})()

        @staticmethod
        def add_noise(x0, noise, t):
            return x0 + noise

    def encode_text(self, tokens):
        return tokens * 1.0

    def predict(self, x_t, t, cond):
        return cond

    def target(self, x0, noise, t):
        return x0


def test_fitted_tokens_lower_the_decoder_loss_from_their_init():
    fit_free_tokens = runpy.run_path(str(REPO / "scripts" / "toy" / "conditioning_loss.py"))["fit_free_tokens"]
    x0 = torch.randn(4, 3, 5)
    init = torch.zeros_like(x0)
    fitted = fit_free_tokens(_X0Decoder(), x0, init, steps=200, lr=0.05, seed=0, min_t=600)
    assert init.abs().sum() == 0  # the init is not modified in place
    assert (fitted - x0).pow(2).mean() < 0.01 * x0.pow(2).mean()
    assert not fitted.requires_grad


def test_normalised_fit_stays_on_the_poolers_output_set():
    """With a match_embeddings pooler, fitted tokens are per-token layer-normed then scaled and shifted by the
    embedding statistics, like the pooler's own outputs, and still lower the loss from their init."""
    fit_free_tokens = runpy.run_path(str(REPO / "scripts" / "toy" / "conditioning_loss.py"))["fit_free_tokens"]
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 5)
    pooler = type("P", (), {"embed_std": torch.tensor([0.5, 1.0, 2.0, 1.0, 0.1]),
                            "embed_mean": torch.tensor([0.0, 1.0, -1.0, 0.0, 0.3])})()
    raw = torch.randn(4, 3, 5)
    init = torch.nn.functional.layer_norm(raw, (5,)) * pooler.embed_std + pooler.embed_mean
    fitted = fit_free_tokens(_X0Decoder(), x0, init, steps=300, lr=0.05, seed=0, pooler=pooler)
    z = (fitted - pooler.embed_mean) / pooler.embed_std
    assert torch.allclose(z.mean(-1), torch.zeros(4, 3), atol=1e-4)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones(4, 3), atol=1e-2)
    assert (fitted - x0).pow(2).mean() < 0.8 * (init - x0).pow(2).mean()
