"""A text-only draft for the study model, distilled from the model's own answers (issue 17).

    python -m aim.study.draft --out aim/default_model/draft [--model DIR] [--examples 1200]

The draft is transformers' ``Qwen2ForCausalLM`` with the study tokenizer's vocabulary (a few
hundred thousand parameters, :data:`DRAFT_MODEL`). It never sees pixels: at inference
`aim.speculative` hands it the conversation with the visual placeholder tokens removed, so it is
trained on exactly that text. Its training targets are the *target's* greedy answers (sequence-level
distillation, as Gagrani et al. fine-tune their draft on the target's outputs): the study model
describes each of ``--examples`` training-split scenes ("describe the video ." asked alone, as the
benchmark and the demo ask it) and the draft learns to continue the text-only prompt with that
description, ``<|im_end|>`` included. (Only descriptions: the study model answers its one-word
questions with one word and was never trained on what follows it.) What a text-only draft can
learn is the answers' form (the description template, where it ends) and their prior; the scene's
colours, shapes and directions it can only guess, which is what bounds its acceptance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers as tf
from tqdm import tqdm

from aim import tiny
from aim.speculative import visual_token_ids

from . import data
from .model import DEFAULT_MODEL_DIR, _no_progress_bar, load_default_model, model_inputs, to_inputs

logger = logging.getLogger(__name__)

#: where the draft of the shipped default model ships
DEFAULT_DRAFT_DIR = DEFAULT_MODEL_DIR / "draft"
#: sizes of the draft: 3 layers of width 96 (about 0.3 M parameters; the target has about 3 M)
DRAFT_MODEL = dict(num_layers=3, hidden_size=96)
#: most tokens a study answer takes (the longest description is 17 words and its end)
MAX_ANSWER_TOKENS = 32


def end_token_ids(processor) -> list[int]:
    """Ids that end an answer: the tokenizer's eos and ``<|im_end|>`` (study answers end with it)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return sorted({int(tokenizer.eos_token_id), int(tokenizer.convert_tokens_to_ids("<|im_end|>"))})


def build_draft(seed: int = 0, num_layers: int = DRAFT_MODEL["num_layers"],
                hidden_size: int = DRAFT_MODEL["hidden_size"]) -> tf.Qwen2ForCausalLM:
    """A randomly initialised draft (deterministic by ``seed``): the study vocabulary, tied embeddings."""
    config = tf.Qwen2Config(
        vocab_size=tiny.VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, **tiny.TOKEN_IDS,
    )
    torch.manual_seed(seed)
    draft = tf.Qwen2ForCausalLM(config)
    draft.eval()
    return draft


def description_questions(examples: Sequence[data.Example]) -> list[data.Example]:
    """Each example asking only for its description (recipes with descriptions, e.g. ``v2``)."""
    return [dataclasses.replace(e, qa=(data.description_of(e),)) for e in examples]


@torch.no_grad()
def target_answers(model, processor, examples: Sequence[data.Example], batch_size: int = 16,
                   max_new_tokens: int = MAX_ANSWER_TOKENS, progress: bool = False) -> list[list[int]]:
    """The target's greedy answer to each example's first question, as token ids up to and
    including its end token (one modality per batch, left padded)."""
    ends = end_token_ids(processor)
    answers: list[list[int] | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: (examples[i].is_video, len(examples[i].question), i))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    groups = [g for group in groups for g in _split_modalities(group, examples)]
    for group in tqdm(groups, desc="target answers", disable=not progress, leave=False):
        inputs = model_inputs(to_inputs([examples[i] for i in group], processor, model.config))
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
                             pad_token_id=tiny.PAD_ID)
        for i, row in zip(group, out[:, inputs["input_ids"].shape[1] :].tolist()):
            stop = next((j for j, t in enumerate(row) if t in ends), len(row) - 1)
            answers[i] = row[: stop + 1]
    return answers  # type: ignore[return-value]


def _split_modalities(group: list[int], examples: Sequence[data.Example]) -> list[list[int]]:
    videos = [i for i in group if examples[i].is_video]
    images = [i for i in group if not examples[i].is_video]
    return [g for g in (videos, images) if g]


def text_prompt(example: data.Example, processor, config) -> list[int]:
    """The ids the draft sees for the example's first question: its prompt without visual tokens."""
    ids = to_inputs([example], processor, config)["input_ids"][0].tolist()
    visual = set(visual_token_ids(config))
    return [t for t in ids if t not in visual]


def _batch(pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on answer tokens)."""
    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), length), tiny.PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, answer) in enumerate(pairs):
        seq = prompt + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(prompt) : len(seq)] = torch.tensor(answer)
    return ids, mask, labels


def draft_agreement(draft, pairs: Sequence[tuple[list[int], list[int]]]) -> float:
    """Fraction of answer tokens where the draft's greedy next token (teacher-forced on the target's
    answer) is the target's token: the per-token acceptance of greedy speculative decoding."""
    ids, mask, labels = _batch(pairs)
    with torch.no_grad():
        logits = draft(input_ids=ids, attention_mask=mask).logits
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    return float((predicted[keep] == target[keep]).float().mean())


def train_draft(model, processor, out: str | Path, examples: int = 1200, steps: int = 1500,
                batch_size: int = 64, lr: float = 3e-3, seed: int = 0, threads: int = 2,
                recipe: str | None = "v2", val_examples: int = 160) -> dict:
    """Distil a draft from ``model``'s descriptions and save it (with ``draft_training.json``) to ``out``."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_draft(model, processor, Path(out), examples, steps, batch_size, lr, seed, recipe, val_examples)
    finally:
        torch.set_num_threads(previous_threads)


def _train_draft(model, processor, out: Path, examples, steps, batch_size, lr, seed, recipe, val_examples) -> dict:
    start = time.perf_counter()
    train_set = description_questions(data.dataset("train", examples, recipe=recipe))
    val_set = description_questions(data.dataset("val", val_examples, recipe=recipe))
    answers = target_answers(model, processor, train_set + val_set, progress=True)
    pairs = [(text_prompt(e, processor, model.config), a) for e, a in zip(train_set + val_set, answers)]
    train_pairs, val_pairs = pairs[: len(train_set)], pairs[len(train_set) :]
    answer_seconds = time.perf_counter() - start

    draft = build_draft(seed=seed)
    n_params = sum(p.numel() for p in draft.parameters())
    optimiser = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(seed)
    draft.train()
    bar = tqdm(range(steps), desc="train draft", mininterval=5)
    for _ in bar:
        pick = torch.randint(len(train_pairs), (batch_size,), generator=generator).tolist()
        ids, mask, labels = _batch([train_pairs[i] for i in pick])
        loss = draft(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    draft.eval()
    out.mkdir(parents=True, exist_ok=True)
    with _no_progress_bar():
        draft.save_pretrained(out)
    facts = {
        "draft": {**DRAFT_MODEL, "parameters": n_params},
        "target_parameters": sum(p.numel() for p in model.parameters()),
        "settings": dict(examples=examples, steps=steps, batch_size=batch_size, lr=lr, seed=seed, recipe=recipe),
        "answer_tokens": sum(len(a) for _, a in train_pairs),
        "target_answer_seconds": round(answer_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "val_token_agreement": round(draft_agreement(draft, val_pairs), 4),
    }
    (out / "draft_training.json").write_text(json.dumps(facts, indent=1) + "\n")
    logger.info("draft: %d parameters, val token agreement %s", n_params, facts["val_token_agreement"])
    return facts


def greedy(model, prompt: dict, ends: Sequence[int], **extra) -> torch.Tensor:
    """Greedy ``generate`` of one study answer (at most :data:`MAX_ANSWER_TOKENS`, stopping at ``ends``)."""
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False, eos_token_id=list(ends),
                              pad_token_id=tiny.PAD_ID, **extra)


def timed_greedy(model, prompt: dict, ends: Sequence[int], **extra) -> tuple[torch.Tensor, float, float]:
    """:func:`greedy` timed: ``(output, prefill seconds, decode seconds)``.

    The prefill is one forward over the prompt (vision tower included), timed just before the
    ``generate`` call, whose own first forward repeats it; decode is the ``generate`` time less
    that prefill. With a draft, generate's first target forward also verifies the first drafted
    tokens (a few more query tokens than the prompt): that share is counted as decode."""
    with torch.no_grad():
        start = time.perf_counter()
        model(**prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = greedy(model, prompt, ends, **extra)
        return out, prefill, time.perf_counter() - start - prefill


def load_default_draft(path: str | Path | None = None) -> tf.Qwen2ForCausalLM:
    """The draft shipped beside the default model (or the one saved in ``path``), in eval mode."""
    path = Path(path) if path is not None else DEFAULT_DRAFT_DIR
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no draft in {path}; train one with `python -m aim.study.draft --out {path}`")
    with _no_progress_bar():
        draft = tf.Qwen2ForCausalLM.from_pretrained(path, local_files_only=True)
    return draft.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aim.study.draft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder of the draft")
    parser.add_argument("--model", default=None, help="the target study model (default: the shipped one)")
    parser.add_argument("--examples", type=int, default=1200, help="training scenes (the description of each)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, processor = load_default_model(args.model)
    facts = train_draft(model, processor, args.out, examples=args.examples, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    print(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
