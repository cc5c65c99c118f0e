"""decoder_costs.py — parameters, training FLOPs per image and expected ZeRO-2 memory of each frozen decoder's
shipped real-scale config, computed from its models built on the meta device (no weights, no GPU, seconds).

    python scripts/bench/decoder_costs.py [--gpus 8] [--out runs/bench/decoder_costs.json]

For each ``configs/vilex/<name>.yaml`` below, config-only folders of the decoder and of SigLIP-so400m are written
(vilex.models.reference_archs: the public config.json architectures; a tiny tokenizer stands in) and the whole
ViLex model is built as ``vilex pretrain --dry-run`` builds it (vilex.models.registry.weightless). Then:

* parameters of the frozen decoder parts and of the trainable encoder (ViT + pooler);
* model FLOPs per training image at the config's resolution: FlopCounterMode over the encoder's forward (F_enc) and
  the decoder's conditioning + denoiser forward (F_dec), counted as the trainer counts them: 3·F_enc + 2·F_dec
  (the frozen decoder needs input gradients only; no recomputation counted);
* expected memory per GPU under ZeRO-2 with bf16, before activations: the frozen decoder in its configured dtype,
  the encoder's bf16 weights, and its fp32 master weights, Adam moments and bf16 gradients split over the GPUs.
  Activations depend on the micro-batch and checkpointing and are left to a GPU measurement
  (scripts/bench/gpu_stage1.sh).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("sd15_siglip_so400m", "sd21base_siglip_so400m", "sdxl_siglip_so400m", "sd3_siglip_so400m")
TINY_BUILDERS = {"stable_diffusion": "build_tiny_sd", "stable_diffusion_xl": "build_tiny_sdxl",
                 "stable_diffusion_3": "build_tiny_sd3"}
BYTES = {"float32": 4, "bfloat16": 2}


def config_only_model(name: str, work: Path):
    """The ViLex model of ``configs/vilex/<name>.yaml`` on the meta device, from config-only folders."""
    from transformers import SiglipVisionConfig

    import vilex.models.tiny as tiny
    from vilex.config import load_config
    from vilex.models import ViLexModel
    from vilex.models.reference_archs import REFERENCE_ARCHS, save_config_only
    from vilex.models.registry import weightless
    from vilex.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, REPO / "configs" / "vilex" / f"{name}.yaml")
    decoder_id = cfg.model.decoder.name_or_path
    stand_in = work / f"{name}_tiny"  # tokenizers and scheduler (small files, read for real) of the same layout
    getattr(tiny, TINY_BUILDERS[cfg.model.decoder.type])(stand_in)
    folder = work / name
    for part in stand_in.iterdir():
        if part.name.startswith(("tokenizer", "scheduler")) or part.name == "model_index.json":
            (shutil.copytree if part.is_dir() else shutil.copy)(part, folder / part.name)
    from transformers import AutoTokenizer

    save_config_only(decoder_id, folder, vocab_size=len(AutoTokenizer.from_pretrained(folder / "tokenizer")))
    vit = work / "siglip"
    if not vit.exists():
        SiglipVisionConfig(**REFERENCE_ARCHS[cfg.model.vit.name_or_path]["vision"]).save_pretrained(vit)
    cfg.model.decoder.name_or_path, cfg.model.vit.name_or_path = str(folder), str(vit)
    with weightless():
        return cfg, ViLexModel.from_config(cfg.model)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_flops(model) -> tuple[int, int]:
    """(F_enc, F_dec) forward FLOPs for one image, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    tower, decoder = model.encoder.vit, model.decoder
    pixels = torch.zeros(1, 3, tower.image_size, tower.image_size, device="meta")
    with FlopCounterMode(display=False) as enc:
        tokens = model.encoder(pixels)
    with FlopCounterMode(display=False) as dec:
        cond = decoder.encode_text(tokens, tokens.shape[1])
        x_t = torch.zeros(1, *decoder.model_space_shape, device="meta")
        decoder.predict(x_t, torch.zeros(1, dtype=torch.long, device="meta"), cond)
    return enc.get_total_flops(), dec.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8, help="GPUs the ZeRO-2 partitions are split over")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "decoder_costs.json")
    args = p.parse_args()
    import vilex.models.decoders  # noqa: F401 - registers every decoder type
    from vilex.models.registry import FROZEN_DECODERS

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            path = REPO / "configs" / "vilex" / f"{name}.yaml"
            if not path.is_file():
                print(f"{name}: no config (skipped)")
                continue
            import yaml

            if yaml.safe_load(path.read_text())["model"]["decoder"]["type"] not in FROZEN_DECODERS.names():
                print(f"{name}: its decoder type is not registered (skipped)")
                continue
            cfg, model = config_only_model(name, Path(tmp))
            decoder = model.decoder
            from vilex.models.reference_archs import REFERENCE_ARCHS

            # the stand-in tokenizers' vocabularies are smaller than the real ones: add the missing embedding rows
            arch = REFERENCE_ARCHS[yaml.safe_load(path.read_text())["model"]["decoder"]["name_or_path"]]
            parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
            frozen = count(decoder) + sum(
                (arch[part]["vocab_size"] - enc.get_input_embeddings().weight.shape[0])
                * enc.get_input_embeddings().weight.shape[1] for part, enc in zip(parts, decoder.text_encoders))
            trainable = count(model.encoder)
            f_enc, f_dec = training_flops(model)
            n = args.gpus
            frozen_gb = frozen * BYTES[cfg.model.decoder.dtype] / 2**30
            encoder_gb = trainable * (2 + (4 + 8 + 2) / n) / 2**30
            rows.append({"config": name, "decoder": cfg.model.decoder.type, "resolution": decoder.image_size,
                         "decoder_params": frozen, "encoder_params": trainable, "tokens": model.encoder.num_tokens,
                         "token_width": model.encoder.token_width, "fwd_flops_encoder": f_enc,
                         "fwd_flops_decoder": f_dec, "train_flops_per_image": 3 * f_enc + 2 * f_dec,
                         "zero2_gb_per_gpu_before_activations": round(frozen_gb + encoder_gb, 2), "gpus": n})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"| config | decoder | res | decoder params | encoder params | tokens × width | train TFLOP / image | "
          f"ZeRO-2 GiB / GPU ({args.gpus} GPUs, before activations) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['decoder']} | {r['resolution']}² | {r['decoder_params'] / 1e9:.2f} B | "
              f"{r['encoder_params'] / 1e6:.0f} M | {r['tokens']} × {r['token_width']} | "
              f"{r['train_flops_per_image'] / 1e12:.2f} | {r['zero2_gb_per_gpu_before_activations']:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
