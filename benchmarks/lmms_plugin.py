"""benchmarks/lmms_plugin.py — ``vilex_vlm``: our VLM checkpoints as an lmms-eval "simple" model.

``--model vilex_vlm --model_args pretrained=PATH`` loads ``vlm.model.VLM.from_checkpoint(PATH)`` (any tower type,
including ``vilex_tokens``, which has no HF Llava export). Registered through the ``lmms_eval.models`` entry point
(``benchmarks.lmms_entry``), so no lmms-eval fork or ``LMMS_EVAL_PLUGINS`` is needed.

Decisions:
- ``--batch_size N`` batches requests that share generation kwargs, and every greedy answer is the one the doc gets
  at batch size 1 (lmms-eval's guide warns that LLaVA scores change with batch size; tests/test_batch_invariance.py
  runs the same docs at batch 1 and 8). What makes a batched row the same computation as the row alone: prompts
  padded on the LEFT (every answer starts right after its own prompt), the attention mask hiding the padding,
  position ids counting from 0 at each row's first real token (``VLM.generate``), each row cut at its first EOS
  (rows that finish early are padded on). What the batch still changes is floating-point rounding (a matrix
  product's sums depend on its row count: scores move by ~1e-5 in float32 on CPU), which flips a greedy choice
  between two tokens that close (1 of 5483 toy docs at batch 8). So every batched row whose chosen token was ever
  less than the recheck margin ahead of the runner-up is recomputed alone: ``recheck_margin`` (model_args, default
  1e-3) or ``CALIBRATION_FACTOR`` × the largest score difference between the first batch and its rows run alone,
  whichever is larger (the first batch is always run both ways, which sizes the margin for the device and dtype at
  hand). 0.7–1.5% of the toy answers are recomputed in float32. Requests run longest prompt first (least padding)
  and come back in request order. Sampling and beam search are batched as they come, with no such guarantee.
- The prompt is the model's own ``prompt_ids`` (the training chat template, image tokens first), with any literal
  ``<image>`` removed from the task's text, exactly one image per doc. A doc with several images (SEED-Bench's video
  questions carry 8 frames, lmms-eval #132) is refused, naming the doc, unless ``multi_image=middle``: then its
  middle image is used, LLaVA-1.5's SEED-Bench protocol (it evaluates video questions on the middle frame); the
  number of docs reduced so is logged per task.
- Greedy unless the task asks ``do_sample``/``temperature > 0``; ``until`` strings cut the decoded text.
- ``loglikelihood`` is not implemented: the toy suite and the 15 judge-free paper tasks are all ``generate_until``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from vilex.errors import UserError

log = logging.getLogger(__name__)


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids with every row right-aligned (padding on the left) and its (B, T) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


class _Margins(LogitsProcessor):
    """Watches greedy decoding, scores unchanged: per step and row, how far the chosen token is ahead of the
    runner-up, and the top ``keep`` (index, score) pairs when asked (what calibration compares)."""

    def __init__(self, keep: int = 0) -> None:
        self.margins: list[torch.Tensor] = []
        self.keep = keep
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.float().topk(max(2, self.keep), dim=-1)
        self.margins.append((top.values[:, 0] - top.values[:, 1]).cpu())
        if self.keep:
            self.top.append((top.indices[:, :self.keep].cpu(), top.values[:, :self.keep].cpu()))
        return scores


def _top_noise(a: list[tuple[torch.Tensor, torch.Tensor]], ra: int, b: list[tuple[torch.Tensor, torch.Tensor]],
               rb: int, steps: int) -> float:
    """Largest |score difference| of the tokens in both runs' recorded top lists, over the first ``steps`` steps."""
    noise = 0.0
    for (ia, va), (ib, vb) in zip(a[:steps], b[:steps]):
        theirs = dict(zip(ib[rb].tolist(), vb[rb].tolist()))
        for i, v in zip(ia[ra].tolist(), va[ra].tolist()):
            if i in theirs and math.isfinite(v) and math.isfinite(theirs[i]):
                noise = max(noise, abs(v - theirs[i]))
    return noise


@dataclass
class _Options:
    until: list[str]
    max_new_tokens: int
    do_sample: bool
    extra: dict[str, Any]

    @property
    def greedy(self) -> bool:
        return not self.do_sample and int(self.extra.get("num_beams", 1)) == 1


class VilexVLM(lmms):
    """lmms-eval wrapper around ``vlm.model.VLM`` (generate_until; greedy answers independent of the batch size)."""

    is_simple = True

    MULTI_IMAGE = ("error", "middle")
    CALIBRATION_FACTOR = 10  # the recheck margin is at least this many times the noise measured on the first batch
    TOP_KEPT = 8  # tokens per step whose scores calibration compares

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 1, dtype: str = "float32",
                 multi_image: str = "error", recheck_margin: float | str = 1e-3, **kwargs: Any) -> None:
        super().__init__()
        if multi_image not in self.MULTI_IMAGE:
            raise UserError(f"vilex_vlm: multi_image={multi_image!r}; use one of {list(self.MULTI_IMAGE)}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"vilex_vlm: batch_size must be a whole number >= 1 (got {batch_size!r})")
        try:
            self.recheck_margin = float(recheck_margin)
        except ValueError:
            self.recheck_margin = math.nan
        if not self.recheck_margin >= 0:
            raise UserError(f"vilex_vlm: recheck_margin must be a number >= 0 (got {recheck_margin!r})")
        self.multi_image = multi_image
        self.reduced: dict[str, int] = {}  # task -> docs whose several images were reduced to the middle one
        from vlm.data import ImageSpec
        from vlm.model import VLM

        if kwargs:
            log.warning("vilex_vlm: ignoring unknown model_args %s", sorted(kwargs))
        self.batch_size_per_gpu = int(batch_size)
        self._device = torch.device(device)
        self.model = VLM.from_checkpoint(pretrained).to(self._device, dtype=getattr(torch, dtype)).eval()
        tower = self.model.tower
        self.image_spec = ImageSpec(tower.image_size, tower.image_mean, tower.image_std,
                                    self.model.config.tower.image_fit)
        self.image_token = self.model.config.llm.image_token
        eos = self.model.llm.generation_config.eos_token_id
        self.eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.generate_calls = 0  # how many docs this instance generated for (tests count recomputation with it)
        self.noise: float | None = None  # batched vs alone score difference, measured on the first batch
        self.rechecked = 0  # batched answers recomputed alone (near ties, and the calibration batch)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("vilex_vlm supports only generate_until tasks (loglikelihood / multiple_choice "
                                  "output types are not implemented)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vilex_vlm does not implement multi-round generation")

    def _pixels(self, visuals: list[Any], where: str) -> torch.Tensor | None:
        if not visuals:
            return None
        if len(visuals) > 1:
            if self.multi_image == "error":
                raise UserError(f"vilex_vlm: {where} has {len(visuals)} images; the model takes one image per prompt "
                                "(model_args multi_image=middle uses the middle one, as LLaVA-1.5 evaluates "
                                "SEED-Bench's video questions)")
            task = where.split("/")[0]
            if task not in self.reduced:
                log.warning("vilex_vlm: %s has %d images: using the middle one (multi_image=middle); later docs of "
                            "%s alike, counted", where, len(visuals), task)
            self.reduced[task] = self.reduced.get(task, 0) + 1
            visuals = [visuals[len(visuals) // 2]]
        pixels = self.image_spec.render(visuals[0].convert("RGB")).unsqueeze(0)
        return pixels.to(self._device, dtype=next(self.model.parameters()).dtype)

    @staticmethod
    def _options(gen_kwargs: dict[str, Any]) -> _Options:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", 32))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        extra = {k: gen_kwargs[k] for k in ("top_p", "num_beams") if gen_kwargs.get(k) is not None}
        if do_sample:
            extra["temperature"] = temperature or 1.0
        return _Options(until, max_new_tokens, do_sample, extra)

    def _new_tokens(self, row: torch.Tensor) -> list[int]:
        """A generated row up to and including its first EOS: what generate returns for that prompt alone (in a
        batch, rows that finished early go on with padding)."""
        tokens = row.tolist()
        for k, t in enumerate(tokens):
            if t in self.eos_ids:
                return tokens[:k + 1]
        return tokens

    def _run(self, prompts: list[tuple[torch.Tensor, torch.Tensor | None]], opts: _Options,
             keep: int = 0) -> tuple[list[list[int]], torch.Tensor | None, _Margins | None]:
        """One ``generate`` call on left-padded prompts: each row's new tokens, and for greedy decoding the
        (B, steps) margins of the chosen tokens and the recorder."""
        ids, mask = left_pad([p[0] for p in prompts], self.model.tokenizer.pad_token_id)
        images = [p[1] for p in prompts if p[1] is not None]
        watch = _Margins(keep) if opts.greedy else None
        out = self.model.generate(ids.to(self._device), torch.cat(images) if images else None,
                                  attention_mask=mask.to(self._device), max_new_tokens=opts.max_new_tokens,
                                  do_sample=opts.do_sample,
                                  logits_processor=LogitsProcessorList([watch]) if watch else None, **opts.extra)
        tokens = [self._new_tokens(row) for row in out]
        margins = torch.stack(watch.margins, dim=1) if watch and watch.margins else None
        return tokens, margins, watch

    def _generate(self, prompts: list[tuple[torch.Tensor, torch.Tensor | None]], opts: _Options) -> list[list[int]]:
        """New tokens per prompt, each exactly what the prompt gets alone.

        A batched forward is the same computation as a forward alone, but not the same floating-point sums (a
        matrix product's rounding depends on how many rows it has), so a greedy choice between two tokens whose
        scores are within that noise could go either way. Every batched row whose choice was ever closer than
        the recheck margin is recomputed alone; the margin is at least ``recheck_margin`` and
        CALIBRATION_FACTOR × the largest difference measured between the first batch and its rows run alone (so
        it follows the device and dtype). Sampling and beam search are left as they come."""
        if len(prompts) == 1 or not opts.greedy:
            return self._run(prompts, opts)[0]
        calibrate = self.noise is None
        tokens, margins, watch = self._run(prompts, opts, keep=self.TOP_KEPT if calibrate else 0)
        if calibrate:
            noise = 0.0
            for r, prompt in enumerate(prompts):
                (alone,), _, watch_alone = self._run([prompt], opts, keep=self.TOP_KEPT)
                same = next((k for k, (a, b) in enumerate(zip(tokens[r], alone)) if a != b),
                            min(len(tokens[r]), len(alone)))
                steps = min(same + 1, len(tokens[r]), len(alone))  # up to the first step that differs
                noise = max(noise, _top_noise(watch.top, r, watch_alone.top, 0, steps))
                tokens[r] = alone
            self.noise = noise
            self.rechecked += len(prompts)
            log.info("vilex_vlm: batched vs alone scores differ by up to %.3g; recheck margin %.3g", noise,
                     self.margin)
            return tokens
        margin = self.margin
        for r in range(len(tokens)):
            if margins is not None and float(margins[r, :len(tokens[r])].min()) < margin:
                tokens[r] = self._run([prompts[r]], opts)[0][0]
                self.rechecked += 1
        return tokens

    @property
    def margin(self) -> float:
        """The score gap under which a batched greedy choice is recomputed alone."""
        return max(self.recheck_margin, self.CALIBRATION_FACTOR * (self.noise or 0.0))

    def generate_batch(self, contexts: list[str], gen_kwargs: dict[str, Any], visuals: list[list[Any]],
                       wheres: list[str]) -> list[str]:
        """Answer prompts that share ``gen_kwargs`` in one left-padded batch (each as it would be alone)."""
        opts = self._options(gen_kwargs)
        prompts = []
        for context, vis, where in zip(contexts, visuals, wheres):
            pixels = self._pixels(vis, where)
            question = context.replace(self.image_token, "").strip()
            prompts.append((self.model.prompt_ids(question, with_image=pixels is not None)[0], pixels))
        texts = []
        for tokens in self._generate(prompts, opts):
            text = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in opts.until:
                if stop:
                    text = text.split(stop, 1)[0]
            texts.append(text.strip())
        self.generate_calls += len(texts)
        return texts

    def generate_one(self, context: str, gen_kwargs: dict[str, Any], visuals: list[Any], where: str) -> str:
        """Answer one prompt (a batch of one)."""
        return self.generate_batch([context], gen_kwargs, [visuals], [where])[0]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}  # requests with the same generation kwargs may share a batch
        for i, a in enumerate(args):
            groups.setdefault(json.dumps(a[1], sort_keys=True, default=str), []).append(i)
        tok = self.model.tokenizer
        length = [len(tok(a[0], add_special_tokens=False)["input_ids"]) for a in args]
        answers: list[str] = [""] * len(requests)
        bs, rechecked = self.batch_size_per_gpu, self.rechecked
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="vilex_vlm")
        for members in groups.values():
            members = sorted(members, key=lambda i: -length[i])  # longest first: least padding per batch
            for start in range(0, len(members), bs):
                chunk = members[start:start + bs]
                visuals, wheres = [], []
                for i in chunk:
                    _, _, doc_to_visual, doc_id, task, split = args[i]
                    visuals.append(list(doc_to_visual(self.task_dict[task][split][doc_id]) or []))
                    wheres.append(f"{task}/{split}/doc {doc_id}")
                texts = self.generate_batch([args[i][0] for i in chunk], args[chunk[0]][1], visuals, wheres)
                for i, text in zip(chunk, texts):
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
                    answers[i] = text
                pbar.update(len(chunk))
        pbar.close()
        if bs > 1:
            log.info("vilex_vlm: %d of %d answers recomputed alone (near ties under the recheck margin %.3g, and "
                     "the calibration batch)", self.rechecked - rechecked, len(requests), self.margin)
        for task, n in self.reduced.items():
            log.info("vilex_vlm: %s: %d doc(s) had several images, evaluated on the middle one", task, n)
        return answers
