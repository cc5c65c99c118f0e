"""metrics.py — reconstruction metrics: PSNR, SSIM, and FID / IS from a LOCAL Inception-v3.

Images are float tensors in [0, 1], shape (B, 3, H, W). PSNR and SSIM are per image (then averaged by
the caller, so confidence intervals can be computed). FID/IS need Inception-v3 weights that are never
downloaded here: pass a local torchvision ``inception_v3`` state_dict (``--inception-weights``); without
it they are reported as unavailable, with the reason. Note: torchvision's Inception is not the TF-Inception
used for published FIDs, so absolute values are comparable only within this codebase.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vilex.errors import UserError


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB between two batches in [0, max_val]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(max_val**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (scikit-image, Gaussian window as in Wang et al. 2004) on [0, 1] RGB."""
    from skimage.metrics import structural_similarity

    out = []
    for x, y in zip(a.float().cpu().numpy(), b.float().cpu().numpy()):
        win = min(7, x.shape[-1], x.shape[-2])
        win = win if win % 2 == 1 else win - 1
        out.append(structural_similarity(x, y, channel_axis=0, data_range=1.0, win_size=win,
                                         gaussian_weights=win >= 7))
    return torch.tensor(out)


class InceptionFeatures:
    """Pool-3 features and logits of a torchvision Inception-v3 loaded from a local state_dict file."""

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu") -> None:
        import torchvision

        path = Path(weights_path)
        if not path.is_file():
            raise UserError(f"Inception weights not found: {path}")
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.fc_saved = net.fc
        self.net = net.eval().to(device)
        self.device = device
        self._pool: list[torch.Tensor] = []
        net.avgpool.register_forward_hook(lambda m, i, o: self._pool.append(o.flatten(1)))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(images.float().to(self.device), size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        self._pool.clear()
        logits = self.net((x - mean) / std)
        return self._pool[-1].cpu(), logits.cpu()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID between two feature sets (N, D)."""
    from scipy import linalg

    a, b = feats_a.double().numpy(), feats_b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: torch.Tensor, splits: int = 1) -> float:
    """IS = exp(E[KL(p(y|x) || p(y))]) from Inception logits."""
    p = logits.double().softmax(-1)
    scores = []
    for chunk in p.chunk(splits):
        py = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of a normal-approximation 95% confidence interval."""
    v = values.double()
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(1.96 * v.std(unbiased=True) / v.numel() ** 0.5)
