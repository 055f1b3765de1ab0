"""Accuracy of a study model on synthetic video / image QA, overall and per question kind.

    python -m aim.study.evaluate [--model DIR] [--n 800] [--batch-size 16] [--aim] [--json]

The predicted answer is the argmax of the next-token logits at the prompt's last position,
restricted to the closed answer vocabulary of the study (:data:`aim.study.data.ANSWER_WORDS`, all
kinds together: answering a colour to a direction question counts as wrong). Batches hold one
modality (videos or images) and are padded on the left; the model may be patched with
:func:`aim.apply_aim` (it keeps the output length, so the last position is the prompt's last token).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm import tqdm

from . import data
from .model import answer_token_ids, load_default_model, model_inputs, to_inputs

logger = logging.getLogger(__name__)


def chance_levels(kinds: Sequence[str] = data.KINDS, recipe: str | data.Recipe | None = None) -> dict[str, float]:
    """Accuracy of a uniform guess per kind (answers are uniform over each kind's answers under
    the data ``recipe``, default :data:`aim.study.data.DEFAULT_RECIPE`)."""
    return {kind: 1.0 / len(data.answers_of(kind, recipe)) for kind in kinds}


def known_answer_words(processor) -> list[str]:
    """The study's answer words that the processor's vocabulary holds (a model saved before a word
    was added to the study cannot answer it)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    return [w for w in data.ANSWER_WORDS if w in vocab]


@torch.no_grad()
def predict(model, processor, examples: Sequence[data.Example], batch_size: int = 16,
            progress: bool = False) -> list[str]:
    """Predicted one-word answers to the examples' first questions, in the examples' order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    words = known_answer_words(processor)
    ids = torch.tensor(answer_token_ids(processor, words))
    # one modality per batch, similar lengths together; predictions go back to the input order
    order = sorted(range(len(examples)), key=lambda i: (not examples[i].is_video, examples[i].kind, i))
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or examples[current[0]].is_video != examples[i].is_video):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    predictions: list[str | None] = [None] * len(examples)
    for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        inputs = to_inputs([examples[i] for i in batch], processor, model.config)
        inputs = {k: v.to(model.device) for k, v in model_inputs(inputs).items()}
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        best = logits[:, ids.to(logits.device)].argmax(-1).tolist()
        for i, b in zip(batch, best):
            predictions[i] = words[b]
    return predictions  # type: ignore[return-value]


def evaluate(model, processor, examples: Sequence[data.Example], batch_size: int = 16,
             progress: bool = False, recipe: str | data.Recipe | None = None) -> dict:
    """Accuracy of ``model`` on the examples' first questions (``recipe``: the data recipe the
    examples were generated with, for the chance levels).

    Returns:
        ``{"accuracy": float, "n": int, "per_kind": {kind: {"accuracy", "n", "chance"}}}``.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    predictions = predict(model, processor, examples, batch_size, progress)
    hits, counts = defaultdict(int), defaultdict(int)
    for example, answer in zip(examples, predictions):
        counts[example.kind] += 1
        hits[example.kind] += int(answer == example.answer)
    chance = chance_levels(tuple(counts), recipe)
    per_kind = {
        kind: {"accuracy": hits[kind] / counts[kind], "n": counts[kind], "chance": chance[kind]}
        for kind in data.KINDS if kind in counts
    }
    return {"accuracy": sum(hits.values()) / len(examples), "n": len(examples), "per_kind": per_kind}


def standard_error(accuracy: float, n: int) -> float:
    """One standard error of an accuracy measured on `n` independent questions (binomial)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)


def trained_recipe(model_dir=None) -> str:
    """The data recipe a saved study model was trained on (its ``training.json``; ``v1`` where the
    file names none: the first default model predates recipes)."""
    from pathlib import Path

    from .model import DEFAULT_MODEL_DIR

    path = Path(model_dir if model_dir is not None else DEFAULT_MODEL_DIR) / "training.json"
    try:
        return json.loads(path.read_text())["settings"].get("recipe", "v1")
    except (OSError, ValueError, KeyError):
        return data.DEFAULT_RECIPE


def format_report(result: dict, title: str = "") -> str:
    """A table of per-kind accuracy and chance."""
    lines = [title] if title else []
    lines.append(f"{'kind':<18} {'n':>5} {'accuracy':>9} {'chance':>7}")
    for kind, row in result["per_kind"].items():
        lines.append(f"{kind:<18} {row['n']:>5} {row['accuracy']:>9.3f} {row['chance']:>7.3f}")
    lines.append(f"{'all':<18} {result['n']:>5} {result['accuracy']:>9.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: test-split accuracy of the default (or a given) study model."""
    parser = argparse.ArgumentParser(prog="python -m aim.study.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    parser.add_argument("--split", default="test", choices=tuple(data.SPLIT_OFFSETS))
    parser.add_argument("--n", type=int, default=800, help="examples (balanced over the kinds)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", default=None, choices=tuple(data.RECIPES),
                        help="data recipe (default: the one the model was trained on)")
    parser.add_argument("--frames", type=int, default=data.NUM_FRAMES, help="frames per clip")
    parser.add_argument("--aim", action="store_true", help="also evaluate with aim.apply_aim (default AIMConfig)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model, processor = load_default_model(args.model)
    args.recipe = args.recipe or trained_recipe(args.model)
    examples = data.dataset(args.split, args.n, frames=args.frames, recipe=args.recipe)
    results = {"baseline": evaluate(model, processor, examples, args.batch_size, progress=True, recipe=args.recipe)}
    if args.aim:
        from aim import AIMConfig, apply_aim

        config = AIMConfig()
        apply_aim(model, config)
        results["aim"] = evaluate(model, processor, examples, args.batch_size, progress=True, recipe=args.recipe)
        results["aim_config"] = repr(config)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_report(results["baseline"], f"{args.split} split ({args.recipe} data, {args.frames} frames), "
                                                 f"{args.n} examples: baseline"))
        if args.aim:
            print()
            print(format_report(results["aim"], f"with aim.apply_aim(model), {results['aim_config']}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
