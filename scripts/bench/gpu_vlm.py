"""gpu_vlm.py — one stage-2 instruct step on ONE GPU: tokens/s, samples/s, MFU and peak memory with the SigLIP-so400m
tower (729 tokens at 384 px) vs the ViLex tower (75 tokens) vs ViLex + tokens, packed (sdpa_varlen) vs padded, at
LLaVA-665K-like lengths, on the same LLM (issue #21, item 2).

    python scripts/bench/gpu_vlm.py                                    # Qwen2.5-1.5B shapes (~1 min on an H200)
    python scripts/bench/gpu_vlm.py --llm qwen2.5-7b --weights bf16 --layouts packed --checkpointing on
    python scripts/bench/gpu_vlm.py --device cpu --tiny                # the same code path at tiny shapes (CPU)
    bash scripts/bench/gpu_all.sh --only vlm                           # as the one GPU script runs it (both)

Why Qwen2.5-1.5B shapes by default — the memory arithmetic for one H200 (140 GiB; 139 usable by PyTorch), no
ZeRO-offload. The recipe (configs/vlm/qwen2.5-7b_*.yaml: instruct trains projector + LLM in bf16 with fp32 master
weights and AdamW) keeps 16 bytes per trained parameter: bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m and v
8 (DeepSpeed's layout; torch with fp32 weights under bf16 autocast is also 16: fp32 weights 4 + fp32 grads 4 + m, v 8,
plus a 2-byte bf16 copy of every weight cached by autocast during the step). Qwen2.5-7B has 7.62e9 parameters:
121.9 GB = 113.5 GiB of training state before any activation (torch autocast: 127.7 GiB). A 16-sample micro-batch at
LLaVA-665K lengths (~16k tokens; 32k padded) adds, with activation checkpointing, ~3 GiB of saved layer inputs, ~8
GiB for one layer's recomputation and its gradients, ~3 GiB of logits at the learned positions, 2 GiB of towers and
the allocator's fragmentation: 130-140 GiB, within 0-10 GiB of the card, and over it padded or under autocast. That
does not fit with a margin a one-shot run can bet on, so the recipe's measurement uses Qwen2.5-1.5B shapes (1.54e9
parameters: 23.0 GiB of state), as the issue allows. ``--llm qwen2.5-7b --weights bf16`` measures the 7B shapes too,
with bf16 weights and bf16 AdamW states (8 bytes per parameter: 56.7 GiB): the forward and backward are the recipe's
(same shapes, bf16 matmuls, checkpointing); the optimizer reads and writes half the recipe's bytes, a few percent of
a step. gpu_all.sh runs both.

What one step is (vlm.model.VLM as `vilex train-vlm --stage instruct` runs it with the torch strategy): the frozen tower
(bf16) and the projector (mlp2x_gelu) make the image features, the LLM (random weights from a Qwen2Config of the
real shapes, attn_implementation sdpa_varlen) runs forward and backward under bf16 autocast with activation
checkpointing (the recipe's; ``--checkpointing both`` also measures it off), the loss applies lm_head at the learned
positions only; then grad clipping at 1.0 and one fused AdamW step over LLM + projector (one kernel over all tensors:
torch's foreach AdamW would allocate full-size temporaries, and DeepSpeed's FusedAdam is what the recipe runs).
Micro-batch: 16 samples (the recipe's micro_batch_size), inputs already on the GPU (a loader overlaps the copy).

Towers (random weights, nothing downloaded): ``siglip`` = SigLIP-so400m/14 at 384 px, penultimate layer, 729 tokens
(vlm.towers.SiglipPatchTower); ``vilex`` = the ViLex encoder (SigLIP-so400m/14 at 224 px as stage 1 trains it +
the 5-block pooler) with ONLY its 75 tokens going to the LLM — the paper's efficiency argument; vlm/towers.py has no
such type yet (its ``vilex`` passes the ViT's patch tokens), so it is defined here on top of ``ViLexTokensTower``;
``vilex_tokens`` = vlm.towers.ViLexTokensTower: the 256 patch tokens of that ViT + the 75 ViLex tokens (331).

Lengths: text tokens and text-only share drawn from the LLaVA-665K-shaped mixture of scripts/bench/vlm_packing.py
(``LLAVA_665K_MIX``: the published composition of llava_v1_5_mix665k, log-normal per-source lengths, ShareGPT
text-only); each sample = its image tokens (the tower's count) + its text, truncated at max_length 2048; the second
half of the text is learned. The same samples, in the same micro-batches, for every tower and layout. ``packed``:
vlm.packing's rows of up to 2048 tokens, position ids restarting per sample, sdpa_varlen (one causal SDPA call per
sample); ``padded``: one sample per row padded to the longest, a 2D mask (transformers' sdpa; LLaVA's own padded
batches).

Numbers: step time = median over the timed micro-batches (each synchronised; one warm-up micro-batch first).
tokens/s counts real tokens (no padding); samples/s is what compares towers (same conversations, fewer image tokens).
MFU = model FLOPs / step time / measured dense bf16 matmul peak; model FLOPs counted by FlopCounterMode on a forward
of the PACKED batch (real tokens only, attention per sample): F_tower (frozen: forward only) + 3 x (projector + LLM),
the same numerator for both layouts, so padding shows as lost MFU. Peak memory = max_memory_allocated per
configuration. ``--tiny`` divides every length by 16 and shrinks every model (CPU: dry-run numbers, not results).

Output: JSON (--out) and a table whose last lines are the ratios; the very last: ViLex vs SigLIP samples/s, packed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_stage1 import (
    Budget,
    environment,
    fill_defaults,
    first_line,
    fmt,
    matmul_peak,
    peak_memory_gib,
    reset_memory,
    run_and_report,
    setup_device,
    sync,
    top_kernels,
    write_json,
)

# config.json architecture fields of the Qwen2.5 checkpoints (Qwen/Qwen2.5-{1.5B,7B}-Instruct)
LLM_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # --tiny: Qwen2's layout (GQA, tied embeddings, 5.8x MLP like 1.5B) at a few hundred thousand parameters
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True),
}
TOWERS = ("siglip", "vilex", "vilex_tokens")
MAX_LENGTH, TINY_SCALE = 2048, 16
BYTES_PER_PARAM = {"fp32-master": 16, "bf16": 8}  # trained weights + grads + AdamW m, v (see the docstring)


def build_towers(device: torch.device, tiny: bool) -> dict[str, torch.nn.Module]:
    """The three towers (frozen, bf16), random weights at the real shapes (or tiny)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vilex.models.encoder import AttentionPooler
    from vilex.models.reference_archs import SIGLIP_SO400M_224, SIGLIP_SO400M_384
    from vlm.towers import VILEX_TOKEN_GROUP, SiglipPatchTower, ViLexTokensTower

    class ViLexTokensOnly(ViLexTokensTower):
        """ONLY the first m ViLex tokens reach the LLM (no patch tokens): the ViT's last layer + final norm (stage 1's
        feature layer -1) -> the pooler -> m tokens."""

        @property
        def feature_groups(self) -> OrderedDict[str, tuple[int, int]]:
            return OrderedDict([(VILEX_TOKEN_GROUP, (self.num_vilex_tokens, int(self.pooler.config.output_width)))])

        def forward(self, pixel_values: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
            hidden = self.vit(pixel_values.to(self.vit.dtype)).last_hidden_state  # no hidden_states list kept
            return OrderedDict([(VILEX_TOKEN_GROUP, self.pooler(hidden)[:, : self.num_vilex_tokens])])

    if tiny:
        siglip_cfg = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                          image_size=28, patch_size=4)  # 49 tokens ~ 729 / 16
        vilex_cfg = dict(siglip_cfg, image_size=16)  # 16 patch tokens ~ 256 / 16
        pooler = dict(num_tokens=5, width=32, depth=1, heads=2, output_width=24)  # 5 tokens ~ 75 / 16
    else:
        siglip_cfg, vilex_cfg = SIGLIP_SO400M_384, SIGLIP_SO400M_224
        # the stage-1 pooler of configs/vilex/sd21base_siglip_so400m.yaml; tokens as wide as OpenCLIP-H's embeddings
        pooler = dict(num_tokens=75, width=1024, depth=5, heads=16, output_width=1024)
    torch.manual_seed(0)
    with torch.device(device):
        siglip = SiglipVisionModel(SiglipVisionConfig(**siglip_cfg, vision_use_head=False))
        vilex_vit = SiglipVisionModel(SiglipVisionConfig(**vilex_cfg, vision_use_head=False))
        pool = AttentionPooler(num_tokens=pooler["num_tokens"], input_width=vilex_vit.config.hidden_size,
                               output_width=pooler["output_width"], width=pooler["width"], depth=pooler["depth"],
                               heads=pooler["heads"])
        pool.set_embedding_statistics(torch.randn(1000, pooler["output_width"]) * 0.02)  # an embedding-like scale
    siglip, vilex_vit, pool = (m.to(torch.bfloat16).requires_grad_(False) for m in (siglip, vilex_vit, pool))
    n = pooler["num_tokens"]
    return {"siglip": SiglipPatchTower(siglip, feature_layer=-2),
            "vilex": ViLexTokensOnly(vilex_vit, pool, pooler_feature_layer=-1, num_tokens=n, feature_layer=-2),
            "vilex_tokens": ViLexTokensTower(vilex_vit, pool, pooler_feature_layer=-1, num_tokens=n,
                                             feature_layer=-2)}


def build_llm(name: str, weights: str, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import vlm.varlen_attention  # noqa: F401  (registers attn_implementation "sdpa_varlen")

    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device (seconds for 7.6e9 parameters on a GPU)
        llm = Qwen2ForCausalLM._from_config(Qwen2Config(**LLM_SHAPES[name]), dtype=dtype,
                                            attn_implementation="sdpa_varlen")
    return llm


def draw_samples(n: int, seed: int, scale: int) -> list[tuple[int, bool]]:
    """(text tokens, has image) of n samples from vlm_packing's LLaVA-665K-shaped mixture, lengths / scale."""
    from vlm_packing import draw_lengths

    return [(max(4, round(text / scale)), image) for text, image in draw_lengths(n, np.random.default_rng(seed))]


def make_examples(samples: list[tuple[int, bool]], image_tokens: int, image_token_id: int, vocab: int,
                  image_size: int, max_length: int, seed: int):
    """vlm.data Examples of the drawn lengths: [image tokens] + text, truncated at max_length; the second half of the
    text is learned (targets pre-shifted, as templates.py makes them)."""
    from vlm.data import Example
    from vlm.templates import IGNORE, TokenizedSample

    rng = np.random.default_rng(seed)
    out = []
    for i, (text, image) in enumerate(samples):
        ids = rng.integers(10, vocab - 10, size=text).tolist()
        labels = [IGNORE] * (text // 2) + ids[text // 2:]
        if image:
            ids, labels = [image_token_id] * image_tokens + ids, [IGNORE] * image_tokens + labels
        cut = max(0, len(ids) - max_length)
        ids, labels = ids[:max_length], labels[:max_length]
        targets = labels[1:] + [IGNORE]
        tokens = TokenizedSample(f"s{i}", torch.tensor(ids), torch.tensor(targets), image, truncated_tokens=cut)
        pixels = torch.from_numpy(rng.standard_normal((3, image_size, image_size)).astype(np.float32)) if image else None
        out.append(Example(tokens, pixels))
    return out


def to_device(batch, device: torch.device) -> dict[str, torch.Tensor | None]:
    inputs = batch.model_inputs(device)
    if inputs["pixel_values"] is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)  # the tower's dtype
    return inputs


class VLMBench:
    def __init__(self, args: argparse.Namespace) -> None:
        from vlm.config import LLMConfig, TowerConfig, VLMModelConfig
        from vlm.model import VLM
        from vlm.packing import Collator
        from vlm.projector import build_projectors

        self.args = args
        self.device = setup_device(args.device)
        self.budget = Budget(args.budget_s)
        self.peak = matmul_peak(self.device)
        t0 = time.perf_counter()
        self.llm = build_llm(args.llm, args.weights, self.device)
        towers = build_towers(self.device, args.tiny)
        build_s = time.perf_counter() - t0
        width = self.llm.config.hidden_size
        vocab = self.llm.config.vocab_size
        self.image_token_id = vocab - 1  # random text ids stay in [10, vocab - 10)
        proj_dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32  # fp32 masters under autocast
        self.vlms = {}
        for name in args.towers:
            tower = towers[name]
            projectors = build_projectors("mlp2x_gelu", tower.feature_groups, width).to(self.device, proj_dtype)
            cfg = VLMModelConfig(tower=TowerConfig(type=name, name_or_path=f"random weights ({name})"),
                                 llm=LLMConfig(name_or_path=f"random weights ({args.llm} shapes)",
                                               dtype="bfloat16" if args.weights == "bf16" else "float32",
                                               attn_implementation="sdpa_varlen"))
            vlm = VLM(tower, projectors, self.llm, None, self.image_token_id, cfg)
            vlm.set_trainable(["projector", "llm"])  # instruct
            self.vlms[name] = vlm.train()
        params = [p for p in self.llm.parameters()] + [p for v in self.vlms.values() for p in v.projectors.parameters()]
        self.params = params
        # fused: one kernel over all tensors (foreach would allocate full-size temporaries: 6 GiB at 1.5B fp32)
        self.opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=True)
        scale = TINY_SCALE if args.tiny else 1
        self.max_length = MAX_LENGTH // scale
        n_batches = 1 + args.micro_batches
        samples = draw_samples(args.micro_batch * n_batches, args.seed, scale)
        self.batches: dict[str, dict[str, list]] = {}
        for name, vlm in self.vlms.items():
            examples = make_examples(samples, vlm.num_image_tokens, self.image_token_id, vocab, vlm.image_size,
                                     self.max_length, args.seed)
            chunks = [examples[i * args.micro_batch:(i + 1) * args.micro_batch] for i in range(n_batches)]
            self.batches[name] = {layout: [Collator(0, layout == "packed", self.max_length)(c) for c in chunks]
                                  for layout in ("packed", "padded")}
        n_params = sum(p.numel() for p in self.llm.parameters())
        self.result: dict[str, Any] = {
            "part": "vlm", "tiny": args.tiny, "environment": environment(self.device), "llm": args.llm,
            "llm_params": n_params, "weights": args.weights, "build_s": build_s,
            "training_state_gib": n_params * BYTES_PER_PARAM[args.weights] / 2**30,
            "matmul_peak_tflops": self.peak / 1e12, "micro_batch": args.micro_batch, "max_length": self.max_length,
            "towers": {n: {"image_tokens": v.num_image_tokens, "image_size": v.image_size,
                           "params": sum(p.numel() for p in v.tower.parameters())} for n, v in self.vlms.items()},
            "samples": {"text_only": sum(not image for _, image in samples), "total": len(samples),
                        "mean_text_tokens": float(np.mean([t for t, _ in samples]))},
            "budget_s": args.budget_s, "rows": [], "complete": False}
        self.flops: dict[str, list[float]] = {}
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = self.budget.used()
        write_json(self.args.out, self.result)

    def count_flops(self, name: str) -> list[float]:
        """Model FLOPs per timed micro-batch: F_tower + 3 x (projector + LLM), on the packed layout."""
        from torch.utils.flop_counter import FlopCounterMode

        vlm, out = self.vlms[name], []
        for batch in self.batches[name]["packed"][1:]:
            inputs = to_device(batch, self.device)
            tower_fc, all_fc = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16):
                if inputs["pixel_values"] is not None:
                    with tower_fc:
                        vlm.tower(inputs["pixel_values"])
                with all_fc:
                    vlm(**inputs)
            tower = tower_fc.get_total_flops()
            out.append(tower + 3 * (all_fc.get_total_flops() - tower))
        return out

    def set_checkpointing(self, on: bool) -> None:
        from gpu_stage1 import checkpointing_off, checkpointing_on

        from vilex.models.towers import enable_activation_checkpointing

        if on and not checkpointing_on(self.llm):
            enable_activation_checkpointing(self.llm)
        elif not on and checkpointing_on(self.llm):
            checkpointing_off(self.llm)

    def step(self, vlm, inputs) -> tuple[float, float]:
        """(forward + backward seconds, optimizer seconds) of one instruct step."""
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, torch.bfloat16):
            loss = vlm(**inputs)["loss"]
        loss.backward()
        sync(self.device)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return t1 - t0, time.perf_counter() - t1

    def measure(self, name: str, layout: str, checkpointing: bool) -> dict:
        vlm, batches = self.vlms[name], self.batches[name][layout]
        timed = batches[1:]
        row: dict[str, Any] = {"tower": name, "image_tokens": vlm.num_image_tokens, "layout": layout,
                               "checkpointing": checkpointing}
        flops = self.flops[name]
        estimate = sum(flops) / (0.2 * self.peak) * (1 + 1 / len(timed)) + self.args.min_measure_s
        if self.budget.left() < estimate:
            row["status"] = "skipped: time budget"
            return self.record(row)
        self.set_checkpointing(checkpointing)
        reset_memory(self.device)
        try:
            self.step(vlm, to_device(batches[0], self.device))  # warm-up: kernels, allocator, AdamW state
            times = []
            for batch in timed:
                if times and self.budget.left() < self.args.min_measure_s / 2 + 2 * max(sum(t) for t in times):
                    break
                times.append(self.step(vlm, to_device(batch, self.device)))
        except Exception as e:  # an OOM, or a kernel that fails here: recorded, the other rows still run
            self.opt.zero_grad(set_to_none=True)
            row.update(status="oom" if isinstance(e, torch.OutOfMemoryError) else f"unavailable: {first_line(e)}",
                       error=first_line(e))
            reset_memory(self.device)
            return self.record(row)
        n = len(times)
        used = timed[:n]
        step_s = [a + b for a, b in times]
        real = sum(b.real_tokens for b in used)
        processed = sum(b.padded_tokens for b in used)
        row.update(status="ok", steps=n, step_s=statistics.median(step_s),
                   fwd_bwd_s=statistics.median(a for a, _ in times), opt_s=statistics.median(b for _, b in times),
                   samples_per_s=sum(b.num_samples for b in used) / sum(step_s), tokens_per_s=real / sum(step_s),
                   processed_tokens_per_s=processed / sum(step_s), padding_fraction=1 - real / processed,
                   rows_per_step=float(np.mean([b.input_ids.shape[0] for b in used])),
                   row_width=float(np.mean([b.input_ids.shape[1] for b in used])),
                   mfu=sum(flops[:n]) / sum(step_s) / self.peak, tflops_per_step=float(np.mean(flops[:n])) / 1e12,
                   peak_mem_gib=peak_memory_gib(self.device))
        return self.record(row)

    def record(self, row: dict) -> dict:
        self.result["rows"].append(row)
        self.save()
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        return row

    def run(self) -> None:
        for name in self.vlms:
            self.flops[name] = self.count_flops(name)
        self.result["tflops_per_micro_batch"] = {n: float(np.mean(f)) / 1e12 for n, f in self.flops.items()}
        for checkpointing in self.args.checkpointing:
            for name in self.vlms:
                for layout in self.args.layouts:
                    self.measure(name, layout, checkpointing)
        self.profile()
        self.result["summary"] = self.summary()
        self.result["complete"] = True
        self.save()

    def profile(self) -> None:
        """Top kernels of the packed SigLIP step (the note's profile when MFU misses 40 %)."""
        name = "siglip" if "siglip" in self.vlms else next(iter(self.vlms))
        ok = [r for r in self.result["rows"] if r["tower"] == name and r.get("status") == "ok"]
        if not ok or self.budget.left() < self.args.min_measure_s + 4 * ok[0]["step_s"]:
            self.result["profile"] = {"status": "skipped: time budget"}
            return
        self.set_checkpointing(ok[0]["checkpointing"])
        inputs = to_device(self.batches[name][ok[0]["layout"]][1], self.device)
        try:
            profile = top_kernels(lambda: self.step(self.vlms[name], inputs), self.device)
            self.result["profile"] = {"status": "ok", "tower": name, "layout": ok[0]["layout"],
                                      "checkpointing": ok[0]["checkpointing"], **profile}
        except Exception as e:  # diagnostics only
            self.result["profile"] = {"status": f"unavailable: {first_line(e)}"}
        reset_memory(self.device)

    def summary(self) -> dict[str, Any]:
        ok = {(r["tower"], r["layout"], r["checkpointing"]): r for r in self.result["rows"] if r.get("status") == "ok"}
        out: dict[str, Any] = {"vs_siglip": [], "packed_vs_padded": [], "best_packed_mfu": None}
        for (tower, layout, ckpt), r in ok.items():
            base = ok.get(("siglip", layout, ckpt))
            if tower != "siglip" and base:
                out["vs_siglip"].append({"tower": tower, "layout": layout, "checkpointing": ckpt,
                                         "samples_per_s_speedup": r["samples_per_s"] / base["samples_per_s"]})
            padded = ok.get((tower, "padded", ckpt))
            if layout == "packed" and padded:
                out["packed_vs_padded"].append({"tower": tower, "checkpointing": ckpt,
                                                "speedup": r["samples_per_s"] / padded["samples_per_s"]})
        packed = [r for r in ok.values() if r["layout"] == "packed"]
        if packed:
            best = max(packed, key=lambda r: r["mfu"])
            out["best_packed_mfu"] = {"tower": best["tower"], "checkpointing": best["checkpointing"], "mfu": best["mfu"]}
        return out

    def print_table(self) -> None:
        r0 = self.result
        print(f"\nstage 2 instruct step — {r0['environment']['device']}; LLM {self.args.llm} shapes "
              f"({r0['llm_params'] / 1e9:.2f}e9 params, {self.args.weights} weights: {r0['training_state_gib']:.1f} GiB "
              f"of state), micro-batch {self.args.micro_batch}, max_length {self.max_length}; "
              f"{self.budget.used():.0f} s")
        print(f"{'tower':13} {'img tok':>7} {'layout':7} {'ckpt':5} {'samples/s':>9} {'tokens/s':>9} {'pad':>5} "
              f"{'MFU':>6} {'peak GiB':>8}  status")
        for r in r0["rows"]:
            print(f"{r['tower']:13} {r['image_tokens']:7d} {r['layout']:7} {r['checkpointing']!s:5} "
                  f"{fmt(r.get('samples_per_s'), '9.2f'):>9} {fmt(r.get('tokens_per_s'), '9.0f'):>9} "
                  f"{fmt(r.get('padding_fraction'), '5.0%'):>5} {fmt(r.get('mfu'), '6.1%'):>6} "
                  f"{fmt(r.get('peak_mem_gib'), '8.1f'):>8}  {r.get('status')}")
        prof = r0.get("profile") or {}
        if "busy" in prof:
            print(f"  profile {prof['tower']} {prof['layout']}: kernels {prof['kernel_ms_per_step']:.1f} ms of "
                  f"{prof['wall_ms_per_step']:.1f} ms per step ({prof['busy']:.0%} busy)")
        for k in prof.get("top", [])[:8]:
            print(f"  profile: {k['share']:6.1%} {k['self_ms_per_step']:8.2f} ms/step  {k['name'][:80]}")
        s = r0.get("summary") or self.summary()
        if s["best_packed_mfu"]:
            b = s["best_packed_mfu"]
            print(f"best packed MFU: {b['mfu']:.1%} ({b['tower']}, checkpointing {b['checkpointing']}; goal >= 40 %)")
        for p in s["packed_vs_padded"]:
            print(f"packed / padded, {p['tower']}, checkpointing {p['checkpointing']}: {p['speedup']:.2f}x samples/s")
        for v in sorted(s["vs_siglip"], key=lambda v: (v["tower"] == "vilex", v["layout"] == "packed", v["checkpointing"])):
            print(f"{v['tower']} ({r0['towers'][v['tower']]['image_tokens']} tokens) vs siglip "
                  f"({r0['towers'].get('siglip', {}).get('image_tokens')} tokens), same LLM, {v['layout']}, "
                  f"checkpointing {v['checkpointing']}: {v['samples_per_s_speedup']:.2f}x samples/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny LLM and towers, lengths / 16 (the CPU dry mode)")
    p.add_argument("--llm", choices=[k for k in LLM_SHAPES if k != "tiny"], default="qwen2.5-1.5b")
    p.add_argument("--weights", choices=list(BYTES_PER_PARAM), default="fp32-master",
                   help="fp32-master: fp32 weights (= masters) under bf16 autocast, the torch strategy's recipe; "
                        "bf16: bf16 weights and AdamW states (what makes 7B shapes fit, see the docstring)")
    p.add_argument("--towers", nargs="+", choices=TOWERS, default=list(TOWERS))
    p.add_argument("--layouts", nargs="+", choices=("packed", "padded"), default=["packed", "padded"])
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                   help="LLM activation checkpointing (the recipe: on)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per step (default 16; --tiny 4)")
    p.add_argument("--micro-batches", type=int, default=None, help="timed micro-batches (default 3; --tiny 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=100.0, help="end by then, whatever is left unmeasured")
    p.add_argument("--min-measure-s", type=float, default=None, help="start no row with less time left (default 5)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/gpu/vlm.json"))
    args = p.parse_args(argv)
    fill_defaults(args, {"micro_batch": 4, "micro_batches": 1, "min_measure_s": 1.0},
                  {"micro_batch": 16, "micro_batches": 3, "min_measure_s": 5.0})
    if args.tiny:
        args.llm = "tiny"
    args.checkpointing = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    run_and_report(VLMBench(args))


if __name__ == "__main__":
    main(sys.argv[1:])
