"""Document hooks of the synthetic ``aim_synth_*`` lmms-eval tasks (see ``make_data``)."""

from __future__ import annotations

import os
import re

LETTERS = "ABCD"


def doc_to_visual(doc: dict) -> list:
    """A video as its file path (lmms-eval's video convention), an image as a PIL RGB image."""
    path = doc.get("video") or doc.get("image")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} of {doc.get('id')} is missing: regenerate the data with "
            "`python -m aim.integrations.lmms_eval.make_data OUTDIR`"
        )
    if doc.get("video"):
        return [path]
    from PIL import Image

    with Image.open(path) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['prompt']}{kwargs.get('post_prompt', '')}"


def extract_choice(prediction: str, options: list[str]) -> str | None:
    """The option letter a free-form answer names: "(B)", "B.", "B", or the option's text."""
    text = prediction.strip()
    match = re.search(r"\(([A-D])\)", text) or re.match(r"^([A-D])(?:[\s.:)]|$)", text)
    if match:
        return match.group(1)
    lowered = text.lower()
    hits = [LETTERS[i] for i, option in enumerate(options) if re.search(rf"\b{re.escape(option.lower())}\b", lowered)]
    return hits[0] if len(hits) == 1 else None


def process_results(doc: dict, results: list) -> dict:
    prediction = results[0] if results else ""
    prediction = getattr(prediction, "text", prediction) or ""
    return {"accuracy": float(extract_choice(str(prediction), doc["options"]) == doc["answer"])}
