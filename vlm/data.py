"""vlm/data.py — LLaVA-format JSON conversations -> ``TokenizedSample`` + image tensor, with every loss counted.

Format (LLaVA's; a JSON list, or JSON lines):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

``image`` is relative to ``image_root``; a record without ``image`` is a text-only sample (mixed in freely). The
image is decoded by ``vilex.data.decode.decode_image`` (EXIF, alpha on white, 16-bit, bombs...) and a missing or
broken file gets the same reasons as everywhere else in the suite (``unreadable``, ``truncated``, ``corrupt``...):
``on_bad_image: skip`` (the default) drops the sample from its micro-batch and counts it by reason (the first few are
named in the log; the counts go to the log and summary.json, and the trainer stops the run above
``max_bad_fraction``), ``error`` stops with the sample id and the reason. Samples whose tokens do not line up with
their labels always raise (templates.py); truncation to ``max_length`` is counted per sample and per token.

Images become squares at the tower's size: ``resize`` (what the exported HF SigLIP processor does), ``crop`` or
``letterbox`` (padded with the tower's mean colour, LLaVA-1.5's "pad").
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vilex.data.decode import BadSample, decode_image
from vilex.data.views import fit_image, to_tensor
from vilex.errors import DataError
from vlm.templates import SampleError, TokenizedSample, build_sample, parse_conversation

log = logging.getLogger(__name__)

# Skipped samples named one by one in the log, per dataset copy (each loader worker has its own): enough to find the
# broken files, without a line per sample when a whole folder is missing; the trainer logs the totals.
NAMED_SKIPS = 10


def read_llava_json(path: str | Path) -> list[dict[str, Any]]:
    """Records of a LLaVA JSON list (or ``.jsonl``); a malformed file is one DataError line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"conversation file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "conversations" not in r:
            raise DataError(f"{path}: record {i} is not a sample (needs 'conversations')")
    return records


def sample_id(record: dict[str, Any], index: int) -> str:
    return str(record.get("id", f"#{index}"))


@dataclass
class ImageSpec:
    """How an image becomes the tower's input tensor."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fit: str = "resize"

    def render(self, img: Image.Image) -> torch.Tensor:
        if self.fit == "resize":
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        else:
            pad = tuple(int(round(m * 255)) for m in self.mean)
            img = fit_image(img, self.size, self.fit, pad)  # type: ignore[arg-type]
        return to_tensor(img, self.mean, self.std)


@dataclass
class Example:
    """A dataset item: the tokens, and the image tensor (or None for text-only samples)."""

    tokens: TokenizedSample
    pixel_values: torch.Tensor | None


@dataclass
class Skipped:
    """A sample dropped by ``on_bad_image: skip`` (counted by reason, never silently)."""

    sample_id: str
    reason: str


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset over LLaVA records; tokenization and image decoding happen lazily per item."""

    def __init__(self, records: list[dict[str, Any]], tokenizer: Any, template: Any, *, image_spec: ImageSpec,
                 image_token: str, image_token_id: int, num_image_tokens: int, max_length: int,
                 image_root: str | Path | None = None, on_too_long: str = "truncate",
                 on_bad_image: str = "skip") -> None:
        self.records = records
        self.tokenizer = tokenizer
        self.template = template
        self.image_spec = image_spec
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_root = Path(image_root) if image_root is not None else None
        self.on_too_long = on_too_long
        self.on_bad_image = on_bad_image
        self.named_skips = 0
        if any("image" in r for r in records) and self.image_root is None:
            raise DataError("samples reference images but no image_root is set")

    def __len__(self) -> int:
        return len(self.records)

    def estimated_length(self, index: int) -> int:
        """A cheap length (image tokens + ~1.3 tokens per word) for length grouping, as LLaVA's modality lengths."""
        r = self.records[index]
        words = sum(len(str(c.get("value", "")).split()) for c in r["conversations"] if isinstance(c, dict))
        return (self.num_image_tokens if "image" in r else 0) + int(1.3 * words) + 8

    def tokens(self, index: int) -> TokenizedSample:
        r = self.records[index]
        sid = sample_id(r, index)
        turns = parse_conversation(sid, r["conversations"])
        has_image = "image" in r and r["image"] is not None
        segments = self.template.segments(sid, turns, has_image)
        return build_sample(sid, segments, self.tokenizer, has_image=has_image, image_token_id=self.image_token_id,
                            num_image_tokens=self.num_image_tokens, max_length=self.max_length,
                            on_too_long=self.on_too_long)

    def load_image(self, index: int) -> torch.Tensor:
        r = self.records[index]
        path = self.image_root / str(r["image"])  # type: ignore[operator]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BadSample("unreadable", f"{path}: {type(e).__name__}") from None
        return self.image_spec.render(decode_image(data))

    def __getitem__(self, index: int) -> Example | Skipped:
        tokens = self.tokens(index)
        pixels = None
        if tokens.has_image:
            try:
                pixels = self.load_image(index)
            except BadSample as e:
                if self.on_bad_image == "skip":
                    self._name_skip(tokens.sample_id, index, e)
                    return Skipped(tokens.sample_id, e.reason)
                raise SampleError(f"sample {tokens.sample_id!r}: image {self.records[index]['image']}: {e}") from None
        return Example(tokens, pixels)

    def _name_skip(self, sid: str, index: int, error: BadSample) -> None:
        """Log which sample was skipped and why, for the first ``NAMED_SKIPS`` skips of this copy."""
        if self.named_skips < NAMED_SKIPS:
            self.named_skips += 1
            more = " (further skips are only counted)" if self.named_skips == NAMED_SKIPS else ""
            log.warning("skipped sample %r: image %s: %s%s", sid, self.records[index]["image"], error, more)
