"""benchmarks/toy_task_fns.py — the functions the toy-suite task YAMLs call through ``!function utils.<name>``.

lmms-eval resolves ``!function utils.x`` relative to the YAML file, so the materialised task folder holds a one-line
``utils.py`` that re-exports this module: the logic stays here, versioned and tested with the package.

Scoring decisions: answers are compared after lower-casing, stripping punctuation and whitespace and keeping only
the first line (tiny models ramble); the captioning task scores CIDEr with pycocoevalcap's ``Cider`` on
lower-cased whitespace tokens (no PTB tokenizer: it needs Java), plus exact match of the normalised caption.
"""
from __future__ import annotations

import re
import string
from typing import Any

from PIL import Image

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """First line, lower case, punctuation removed, whitespace collapsed."""
    first = (text or "").strip().split("\n", 1)[0]
    return " ".join(_PUNCT.sub(" ", first.lower()).split())


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The scene image (absolute path in the doc), as RGB."""
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answer"]


def qa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """exact_match: 1.0 when the normalised prediction equals the normalised answer."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def caption_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    pred = normalize_answer(results[0])
    refs = [normalize_answer(r) for r in doc["references"]]
    return {"cider": {"pred": pred, "refs": refs, "id": doc["doc_key"]},
            "exact_match": float(pred in refs)}


def cider_aggregate(items: list[dict[str, Any]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap) over all predictions; the IDF comes from this set's references."""
    from pycocoevalcap.cider.cider import Cider

    gts = {str(i): it["refs"] or [""] for i, it in enumerate(items)}
    res = {str(i): [it["pred"] or ""] for i, it in enumerate(items)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)
