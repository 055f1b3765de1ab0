"""Document hooks of the offline lmms-eval tasks: the synthetic ``aim_synth_*`` and the study's
``aim_study`` (see ``make_data``)."""

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


# -- aim_study: the study's examples (make_data --study) -----------------------------------------


def study_doc_to_visual(doc: dict) -> list:
    """The clip as its file path (decoded by the model class: decord, all 8 frames), the image as a
    PIL RGB image."""
    path = doc["visual"]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} of {doc.get('id')} is missing: regenerate the data with "
            "`python -m aim.integrations.lmms_eval.make_data OUTDIR --study`"
        )
    if doc["modality"] == "video":
        return [path]
    from PIL import Image

    with Image.open(path) as image:
        return [image.convert("RGB")]


def study_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The study's question as it is (the prompt the model was trained on)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def study_answer(prediction) -> str:
    """The generated answer as compared: its text, stripped and lower-cased."""
    prediction = getattr(prediction, "text", prediction) or ""
    return str(prediction).strip().lower()


def study_process_results(doc: dict, results: list) -> dict:
    """Exact match of the answer, under ``accuracy``, ``<modality>_accuracy`` and the question's kind."""
    correct = float(study_answer(results[0] if results else "") == doc["answer"])
    return {"accuracy": correct, f"{doc['modality']}_accuracy": correct, doc["kind"]: correct}
