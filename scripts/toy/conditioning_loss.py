"""How much a conditioning tells the frozen decoder, per noise level: its denoising loss on held-out scenes.

ViLex trains its tokens by the frozen decoder's denoising loss, so the first question about a checkpoint whose
samples disappoint is whether its tokens lower that loss at all, and where: against the empty prompt (what the
decoder knows with no conditioning) and the scenes' own captions (what words give it). Every conditioning sees the
same images, noise and timesteps, so the differences are paired. The loss is the decoder's training target (ε, v or
flow), averaged per timestep band.

    python scripts/toy/conditioning_loss.py --checkpoint runs/toy/vilex_64 --decoder checkpoints/toy/sd \
        --split runs/toy/vilex_data_64/val --n 128 --tokens 1 16

``--fit-steps N`` adds the tokens fitted to each image by the decoder's own loss (no encoder, N Adam steps from the
encoder's tokens): how far the text-encoder -> cross-attention pathway can take the loss at all. When fitted tokens
reach the caption's loss and the encoder's do not, the encoder is the bottleneck; when they do not either, the
pathway is.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def band_losses(decoder, x0: torch.Tensor, conds: dict[str, torch.Tensor], bands: list[tuple[int, int]],
                repeats: int, seed: int) -> dict[str, dict[str, float]]:
    """{conditioning: {"lo-hi": mean loss}}: ``repeats`` draws of (noise, t uniform in the band) per image."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {name: {} for name in conds}
    for lo, hi in bands:
        sums = {name: 0.0 for name in conds}
        for _ in range(repeats):
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(lo, hi, (x0.shape[0],), generator=gen)
            x_t = decoder.scheduler.add_noise(x0, noise, t)
            target = decoder.target(x0, noise, t)
            for name, cond in conds.items():
                sums[name] += float((decoder.predict(x_t, t, cond) - target).pow(2).mean())
        for name in conds:
            out[name][f"{lo}-{hi}"] = round(sums[name] / repeats, 5)
    return out


def fit_free_tokens(decoder, x0: torch.Tensor, init: torch.Tensor, steps: int, lr: float, seed: int,
                    min_t: int = 0, pooler=None) -> torch.Tensor:
    """Token embeddings fitted per image by the decoder's own loss, no encoder (textual inversion on each image):
    what the text-encoder -> cross-attention pathway can carry at best. Timesteps uniform in [min_t, T). Gradients
    are on here whatever the caller's mode (``main`` runs without them).

    With ``pooler`` (an ``AttentionPooler`` whose output norm is "match_embeddings") the fit stays on the set of
    tokens that pooler can emit (per-token LayerNorm, then the embedding table's per-dimension scale and shift):
    whether that output normalisation, not the encoder, limits what the tokens carry."""
    if pooler is None:
        params = init.detach().clone().requires_grad_(True)
        to_tokens = lambda p: p  # noqa: E731
    else:
        std, mean = pooler.embed_std.detach(), pooler.embed_mean.detach()
        params = ((init.detach() - mean) / std).clone().requires_grad_(True)
        to_tokens = lambda p: torch.nn.functional.layer_norm(p, p.shape[-1:]) * std + mean  # noqa: E731
    opt = torch.optim.Adam([params], lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    T = decoder.scheduler.config.num_train_timesteps
    with torch.enable_grad():
        for _ in range(steps):
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(min_t, T, (x0.shape[0],), generator=gen)
            x_t = decoder.scheduler.add_noise(x0, noise, t)
            cond = decoder.encode_text(to_tokens(params))
            loss = (decoder.predict(x_t, t, cond) - decoder.target(x0, noise, t)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return to_tokens(params).detach()


@torch.no_grad()
def main() -> None:
    from toy.claims import load_test_scenes
    from toy.scenes import world
    from vilex.pipeline import ViLexPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a ViLex run or pipeline folder")
    ap.add_argument("--decoder", required=True, help="the frozen decoder it was trained against")
    ap.add_argument("--split", required=True, help="a generated toy split (use val)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--bands", type=int, nargs="+", default=[0, 200, 400, 600, 800, 1000],
                    help="timestep band edges")
    ap.add_argument("--repeats", type=int, default=2, help="noise draws per image and band")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-steps", type=int, default=0,
                    help="also fit the largest --tokens count per image by the decoder's loss (from the encoder's "
                         "tokens; no encoder): the pathway's capacity. Fitted and measured on the same images")
    ap.add_argument("--fit-lr", type=float, default=1e-2)
    ap.add_argument("--fit-min-t", type=int, default=0, help="fit on timesteps in [this, T)")
    ap.add_argument("--fit-normalised", action="store_true",
                    help="also fit on the pooler's output set (its match_embeddings normalisation): does it limit them?")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args()

    pipe = ViLexPipeline.from_pretrained(args.checkpoint, decoder_name_or_path=args.decoder, device="cpu")
    decoder = pipe.decoder
    images, _, scenes, _ = load_test_scenes(args.split, args.n)
    x0 = decoder.to_model_space(images * 2 - 1)
    captions = {"caption_coarse": [world.caption_coarse(s) for s in scenes],
                "caption_fine": [world.caption_fine(s) for s in scenes]}
    conds = {"empty": decoder.unconditional(len(scenes))}
    conds.update({name: decoder.encode_text(None, None, decoder.tokenize(text)) for name, text in captions.items()})
    tokens = pipe.encode(images)
    conds.update({f"vilex_{m}": decoder.encode_text(tokens[:, :m]) for m in args.tokens})
    if args.fit_steps:
        m = max(args.tokens)
        fitted = fit_free_tokens(decoder, x0, tokens[:, :m], args.fit_steps, args.fit_lr, args.seed, args.fit_min_t)
        conds[f"fitted_{m}"] = decoder.encode_text(fitted)
        if args.fit_normalised:
            fitted = fit_free_tokens(decoder, x0, tokens[:, :m], args.fit_steps, args.fit_lr, args.seed,
                                     args.fit_min_t, pooler=pipe.encoder.pooler)
            conds[f"fitted_{m}_normalised"] = decoder.encode_text(fitted)
    bands = list(zip(args.bands[:-1], args.bands[1:]))
    table = band_losses(decoder, x0, conds, bands, args.repeats, args.seed)
    print("| conditioning | " + " | ".join(f"t {b}" for b in table["empty"]) + " |")
    print("|---|" + "---:|" * len(bands))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"n": len(scenes), "split": args.split, "loss": table}, indent=1))


if __name__ == "__main__":
    main()
