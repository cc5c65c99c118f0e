"""vlm_packing.py — training tokens/s with sequence packing vs LLaVA-style padded batches, same model, side by side.

    python scripts/bench/vlm_packing.py                       # ~2 min on 2 CPU cores
    python scripts/bench/vlm_packing.py --micro-batches 40 --width 512 --layers 4
    python scripts/bench/vlm_packing.py --data llava_v1_5_mix665k.json   # lengths measured from the real file

What is compared (forward + backward of vlm.model.VLM, the same micro-batches of the same samples in every mode,
interleaved so that machine load hits all modes alike):

* padded        LLaVA without length grouping: random micro-batches, each row padded to the longest sample;
* padded+group  LLaVA's ``group_by_modality_length``: mega-batches of 8 x micro-batch samples (8 GPUs) sorted by
                length before splitting;
* packed        our packing: the random micro-batches, samples packed into rows of ``max_length`` (vlm/packing.py);
* packed x4     the same with ``pack_length`` = 4 x max_length (fewer, fuller rows: less padding, longer attention).

Tokens/s counts REAL tokens (padding excluded); padding fraction = padded tokens / all tokens processed. Each
micro-batch is timed ``--repeats`` times and the fastest kept (the machine is shared; the minimum is the stable
statistic).

Length distribution shaped like LLaVA-665K (``llava_v1_5_mix665k``). Without ``--data`` the text lengths are drawn
from a mixture whose weights are the published composition of the mix (LLaVA-1.5 paper, Table 7: LLaVA-Instruct
158K = conversation 58K + detail 23K + reasoning 77K; ShareGPT 40K text-only; VQAv2 83K; GQA 72K; OKVQA 9K;
OCR-VQA 80K; A-OKVQA 66K; TextCaps 22K; RefCOCO 48K; VG 86K) and whose per-source lengths are log-normal with the
medians below — ESTIMATES of the Vicuna-tokenized text length of each source (VQA-style sources merge several short
QA pairs per image; ShareGPT is long and truncated at 2048), not measured here (the file cannot be downloaded on
this machine). Image samples add 576 image tokens (CLIP/SigLIP @336/14; 256 for so400m@224). With ``--data`` the
lengths are those of the given file (image tokens + 1.3 tokens per word, LLaVA's own length estimate).

Scale: to run on a CPU every length (image tokens, text, max_length 2048) is divided by ``--scale`` (default 9:
576 -> 64 image tokens = an 8x8-patch tower, max_length 228); the model is a Qwen2 of ``--width`` x ``--layers``
with Qwen2.5-7B's MLP ratio, so that attention is about the same small share of a token's cost as for the 7B model
at 2048 tokens (4T/(2(4d' + 3 r d)) ~ 5%). The ratio, not the absolute tokens/s, is the result. On CPU (sdpa) a
packed row attends over its whole width under a block-diagonal mask; with flash-attention 2 on GPU the packed
position ids select the varlen kernel, which skips the masked blocks. ``sdpa_varlen`` (vlm/varlen_attention.py, our
default) is that varlen path on any device: one causal sdpa call per packed sample, so attention costs Σ length²
whatever the row length. Both are compared: transformers' sdpa with its block-diagonal mask, and sdpa_varlen.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# source: (samples in 665K, median text tokens, log-normal sigma, has image)
LLAVA_665K_MIX = {
    "llava_conversation": (58_000, 260, 0.45, True),
    "llava_detail": (23_000, 140, 0.25, True),
    "llava_reasoning": (77_000, 210, 0.35, True),
    "sharegpt": (40_000, 900, 0.80, False),
    "vqav2": (83_000, 110, 0.45, True),
    "gqa": (72_000, 130, 0.45, True),
    "okvqa": (9_000, 45, 0.30, True),
    "ocrvqa": (80_000, 120, 0.40, True),
    "aokvqa": (66_000, 70, 0.40, True),
    "textcaps": (22_000, 45, 0.30, True),
    "refcoco": (48_000, 160, 0.45, True),
    "vg": (86_000, 160, 0.45, True),
}
IMAGE_TOKENS, MAX_LENGTH = 576, 2048


def draw_lengths(n: int, rng: np.random.Generator) -> list[tuple[int, bool]]:
    """(text tokens, has image) of ``n`` samples from the LLaVA-665K-shaped mixture (full scale)."""
    names = list(LLAVA_665K_MIX)
    weights = np.array([LLAVA_665K_MIX[k][0] for k in names], dtype=float)
    picks = rng.choice(len(names), size=n, p=weights / weights.sum())
    out = []
    for i in picks:
        _, median, sigma, image = LLAVA_665K_MIX[names[i]]
        text = int(np.clip(rng.lognormal(np.log(median), sigma), 8, MAX_LENGTH - (IMAGE_TOKENS if image else 0)))
        out.append((text, image))
    return out


def lengths_from_file(path: Path, n: int, rng: np.random.Generator) -> list[tuple[int, bool]]:
    records = json.loads(Path(path).read_text())
    picks = rng.choice(len(records), size=min(n, len(records)), replace=False)
    out = []
    for i in picks:
        r = records[int(i)]
        words = sum(len(str(c.get("value", "")).split()) for c in r["conversations"])
        image = "image" in r
        out.append((int(min(1.3 * words + 8, MAX_LENGTH - (IMAGE_TOKENS if image else 0))), image))
    return out


def make_examples(lengths, scale: float, num_image_tokens: int, image_token_id: int, vocab: int, image_size: int,
                  rng: np.random.Generator):
    """Synthetic samples of the drawn lengths: [image tokens] + text; the second half of the text is learned."""
    from vlm.data import Example
    from vlm.templates import IGNORE, TokenizedSample

    examples = []
    for i, (text, image) in enumerate(lengths):
        t = max(4, round(text / scale))
        ids = rng.integers(10, vocab - 10, size=t).tolist()
        labels = [IGNORE] * (t // 2) + ids[t // 2:]
        if image:
            ids = [image_token_id] * num_image_tokens + ids
            labels = [IGNORE] * num_image_tokens + labels
        targets = labels[1:] + [IGNORE]
        tokens = TokenizedSample(f"s{i}", torch.tensor(ids), torch.tensor(targets), image)
        pixels = None
        if image:
            pixels = torch.from_numpy(rng.standard_normal((3, image_size, image_size)).astype(np.float32))
        examples.append(Example(tokens, pixels))
    return examples


def build_model(folder: Path, width: int, layers: int, heads: int, mlp_ratio: float, image_size: int, patch: int):
    from vlm.config import LLMConfig, TowerConfig, VLMModelConfig
    from vlm.model import VLM
    from vlm.tiny import build_tiny_llm, build_tiny_siglip_folder

    build_tiny_llm(folder / "llm", width=width, layers=layers, heads=heads, intermediate=round(mlp_ratio * width))
    build_tiny_siglip_folder(folder / "tower", width=64, layers=2, image_size=image_size, patch_size=patch)
    cfg = VLMModelConfig(tower=TowerConfig(type="siglip", name_or_path=str(folder / "tower")),
                         llm=LLMConfig(name_or_path=str(folder / "llm")))
    vlm = VLM.build(cfg)
    vlm.set_trainable(["projector", "llm"])
    return vlm.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="a LLaVA JSON to take lengths from (else the mixture)")
    p.add_argument("--micro-batch", type=int, default=16, help="samples per micro-batch")
    p.add_argument("--micro-batches", type=int, default=8, help="timed micro-batches per mode (8 = one mega-batch)")
    p.add_argument("--scale", type=float, default=9.0, help="divide all lengths by this (CPU-sized runs)")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--mlp-ratio", type=float, default=5.3, help="MLP width / width (Qwen2.5-7B: 18944/3584 = 5.3)")
    p.add_argument("--repeats", type=int, default=2, help="time each micro-batch this often, keep the fastest")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    import vlm.varlen_attention  # noqa: F401  (registers "sdpa_varlen")
    from vlm.packing import Collator

    patches = round(IMAGE_TOKENS / args.scale) ** 0.5
    patch, image_size = 4, int(round(patches)) * 4
    max_length = round(MAX_LENGTH / args.scale)
    with tempfile.TemporaryDirectory() as tmp:  # the model is in memory once built
        vlm = build_model(Path(tmp), args.width, args.layers, args.heads, args.mlp_ratio, image_size, patch)
    n = args.micro_batch * (args.micro_batches + 1)
    lengths = lengths_from_file(args.data, n, rng) if args.data else draw_lengths(n, rng)
    examples = make_examples(lengths, args.scale, vlm.num_image_tokens, vlm.image_token_id,
                             vlm.llm.config.vocab_size, image_size, rng)
    mb = args.micro_batch
    batches_random = [examples[i:i + mb] for i in range(0, len(examples) - mb + 1, mb)]
    # LLaVA's group_by_modality_length sorts mega-batches of (processes x micro-batch) samples: 8 GPUs here
    mega = 8 * mb
    grouped = [e for i in range(0, len(examples), mega)
               for e in sorted(examples[i:i + mega], key=lambda e: -e.tokens.length)]
    batches_grouped = [grouped[i:i + mb] for i in range(0, len(grouped) - mb + 1, mb)]
    pad_id = vlm.tokenizer.pad_token_id
    # (collator, micro-batches, attention implementation of the LLM)
    modes = {
        "padded (LLaVA)": (Collator(pad_id, False, max_length), batches_random, "sdpa"),
        "padded + length grouping": (Collator(pad_id, False, max_length), batches_grouped, "sdpa"),
        "packed, sdpa block mask": (Collator(pad_id, True, max_length), batches_random, "sdpa"),
        "packed (ours, sdpa_varlen)": (Collator(pad_id, True, max_length), batches_random, "sdpa_varlen"),
        "packed 4 x max_len, varlen": (Collator(pad_id, True, 4 * max_length), batches_random, "sdpa_varlen"),
    }
    built = {name: [collate(b) for b in batches] for name, (collate, batches, _) in modes.items()}
    with torch.no_grad():  # sanity: packing and the attention path change the layout, not the loss
        losses = {}
        for name, (_, _, attn) in modes.items():
            vlm.llm.set_attn_implementation(attn)
            losses[name] = float(vlm(**built[name][0].model_inputs("cpu"))["loss"])
    a = losses["padded (LLaVA)"]
    assert all(abs(b - a) < 1e-4 * max(1.0, abs(a)) for n, b in losses.items() if "group" not in n), losses

    def step(batch, attn: str) -> float:
        vlm.llm.set_attn_implementation(attn)
        vlm.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        vlm(**batch.model_inputs("cpu"))["loss"].backward()
        return time.perf_counter() - t0

    times = {name: 0.0 for name in modes}
    for name, (_, _, attn) in modes.items():  # warm-up (allocator, kernels)
        step(built[name][0], attn)
    for i in range(1, len(batches_random)):  # interleaved, fastest of repeats: load spikes hit no mode alone
        for name, (_, _, attn) in modes.items():
            times[name] += min(step(built[name][i], attn) for _ in range(args.repeats))
    real = {name: sum(b.real_tokens for b in built[name][1:]) for name in modes}
    padded = {name: sum(b.padded_tokens for b in built[name][1:]) for name in modes}

    source = f"from {args.data}" if args.data else "mixture"
    print(f"LLaVA-665K-shaped lengths ({source}), scale 1/{args.scale:g}: "
          f"{vlm.num_image_tokens} image tokens, max_length {max_length}, {mb} samples/micro-batch, "
          f"{len(batches_random) - 1} micro-batches; Qwen2 {args.width}x{args.layers}, {args.threads} threads")
    mean_len = np.mean([e.tokens.length for e in examples])
    print(f"mean sample length {mean_len:.1f} tokens; text-only {sum(not e.tokens.has_image for e in examples)}/"
          f"{len(examples)}")
    base = real["padded (LLaVA)"] / times["padded (LLaVA)"]
    print(f"{'mode':30s} {'tokens/s':>10s} {'vs padded':>10s} {'padding':>9s} {'rows/mb':>8s}")
    for name in modes:
        tps = real[name] / times[name]
        rows = np.mean([b.input_ids.shape[0] for b in built[name][1:]])
        print(f"{name:30s} {tps:10.0f} {tps / base:9.2f}x {1 - real[name] / padded[name]:9.1%} {rows:8.1f}")


if __name__ == "__main__":
    main()
