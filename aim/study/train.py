"""Train the study model from scratch on CPU, on freshly generated synthetic video / image QA.

    python -m aim.study.train --out DIR [--steps 6000] [--batch-size 8] [--seed 0] [--threads 2]

(the defaults are :data:`RECIPE`; ``aim/default_model`` is where the shipped model lives).

Every step draws the next ``batch_size`` training examples of :mod:`aim.study.data` (seeded, so a
run is deterministic by ``--seed`` for a given thread count), asks up to ``--turns`` questions
about each as one conversation, and takes the cross-entropy of the answer tokens only (AdamW,
linear warm-up then cosine decay, gradient clipping). Held-out accuracy on the ``val`` split is
logged every ``--eval-every`` steps; at the end the model and its processor (or tokenizer) are
saved with ``save_pretrained`` and ``training.json`` records the run: settings, steps, wall time,
loss curve and final ``test``-split accuracy per question kind with the chance levels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from . import data
from .evaluate import evaluate, format_report
from .model import STUDY_MODEL, build_model, build_tokenizer, save_model, to_inputs, visual_token_count

logger = logging.getLogger(__name__)

#: training examples reserved per seed: seed ``s`` streams train examples from ``s * SEED_STRIDE``
SEED_STRIDE = 10_000_000

#: the training recipe (defaults of :func:`train` and of the command line): the 12-layer
#: :data:`~aim.study.model.STUDY_MODEL` on the ``v2`` data (descriptions included), sized to train
#: in 90 minutes on 2 CPU cores: 8400 steps at 0.58-0.6 s a step with 2 threads on the current
#: development machine (an Intel Xeon VM; the shipped model took 83.7 min). The first machine (AMD
#: EPYC, 1.15 s a step) fitted 4600 steps: that run's model is ``models/study-4600-steps``.
RECIPE = {"steps": 8400, "batch_size": 8, "lr": 2e-3, "warmup": 200, "weight_decay": 0.05, "turns": 4,
          "eval_every": 500, "eval_size": 320, "recipe": "v2"}


def cosine_lr(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def answer_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (the LM head runs at the answer positions only)."""
    feed = {k: v for k, v in inputs.items() if k not in ("answer_positions", "answer_ids")}
    hidden = model.model(**feed).last_hidden_state  # (B, L, H)
    positions, targets = inputs["answer_positions"], inputs["answer_ids"]
    keep = targets != -100
    rows = torch.arange(hidden.shape[0])[:, None].expand_as(positions)
    logits = model.lm_head(hidden[rows[keep], positions[keep]])
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def train(
    out: str | Path,
    steps: int = RECIPE["steps"],
    batch_size: int = RECIPE["batch_size"],
    lr: float = RECIPE["lr"],
    warmup: int = RECIPE["warmup"],
    weight_decay: float = RECIPE["weight_decay"],
    turns: int = RECIPE["turns"],
    seed: int = 0,
    eval_every: int = RECIPE["eval_every"],
    eval_size: int = RECIPE["eval_size"],
    test_size: int = 800,
    threads: int = 2,
    model_options: dict | None = None,
    kinds: Sequence[str] = data.KINDS,
    recipe: str | None = RECIPE["recipe"],
    frames: Sequence[int] = (data.NUM_FRAMES,),
    lr_floor: float = 0.05,
    train_kinds: Sequence[str] | None = None,
) -> dict:
    """Train a study model and save it to ``out``; returns the facts written to ``training.json``."""
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    torch.set_num_threads(threads)
    model_options = {**STUDY_MODEL, **(model_options or {})}
    model = build_model(seed=seed, **model_options)
    tokenizer = build_tokenizer()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_lr(s, steps, warmup, lr_floor))
    train_kinds = list(train_kinds or kinds)  # repeats weight a kind's scenes up in training
    stream = data.stream("train", start=seed * SEED_STRIDE, kinds=train_kinds, frames=frames, recipe=recipe)
    val = data.dataset("val", eval_size, kinds=kinds, recipe=recipe)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("training %d parameters for %d steps of %d examples", n_params, steps, batch_size)
    torch.manual_seed(seed)

    curve, evals, smooth = [], [], None
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="train", mininterval=5)
    for step in bar:
        model.train()
        batch = [next(stream) for _ in range(batch_size)]
        loss = answer_loss(model, to_inputs(batch, tokenizer, model.config, turns=turns, complete=True))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        if (step + 1) % 25 == 0:
            curve.append({"step": step + 1, "loss": round(smooth, 4), "seconds": round(time.perf_counter() - start, 1),
                          "cpu_seconds": round(time.process_time() - cpu_start, 1)})
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            model.eval()
            result = evaluate(model, tokenizer, val, recipe=recipe)
            evals.append({"step": step + 1, "accuracy": result["accuracy"],
                          "seconds": round(time.perf_counter() - start, 1),
                          "per_kind": {k: v["accuracy"] for k, v in result["per_kind"].items()}})
            logger.info("step %d: loss %.3f, val accuracy %.3f %s", step + 1, smooth, result["accuracy"],
                        {k: round(v["accuracy"], 2) for k, v in result["per_kind"].items()})
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start

    model.eval()
    test = evaluate(model, tokenizer, data.dataset("test", test_size, kinds=kinds, recipe=recipe), progress=True,
                    recipe=recipe)
    logger.info("%s", format_report(test, "test split"))
    # descriptions end with <|im_end|> (the chat template's end of turn, a training target after
    # them): generate stops there too
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    out = save_model(model, out)
    facts = {
        "model": {**model_options, "parameters": n_params,
                  "visual_tokens_per_clip": visual_token_count(model.config, is_video=True),
                  "visual_tokens_per_image": visual_token_count(model.config, is_video=False)},
        "settings": dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                         turns=turns, seed=seed, threads=threads, kinds=list(kinds),
                         recipe=recipe or data.DEFAULT_RECIPE, frames=list(frames), lr_floor=lr_floor,
                         train_kinds=train_kinds),
        "examples_seen": steps * batch_size,
        "train_wall_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}",
        "loss_curve": curve,
        "val_evals": evals,
        "test": test,
    }
    (out / "training.json").write_text(json.dumps(facts, indent=1) + "\n")
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m aim.study.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (model, processor, training.json)")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--warmup", type=int, default=RECIPE["warmup"])
    parser.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"])
    parser.add_argument("--turns", type=int, default=RECIPE["turns"], help="questions asked per example (1 = only the first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=RECIPE["eval_every"], help="steps between val evaluations (0: none)")
    parser.add_argument("--eval-size", type=int, default=RECIPE["eval_size"])
    parser.add_argument("--test-size", type=int, default=800)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=list(data.KINDS), choices=data.KINDS,
                        help="question kinds to train and evaluate on (default: all)")
    parser.add_argument("--recipe", default=RECIPE["recipe"], choices=tuple(data.RECIPES),
                        help="data recipe (default: %(default)s)")
    parser.add_argument("--frames", type=int, nargs="+", default=[data.NUM_FRAMES],
                        help="frames per training clip (several: used in turn); val/test use 8")
    parser.add_argument("--train-kinds", nargs="+", default=None, choices=data.KINDS,
                        help="kinds of the training examples, in turn (repeats weight a kind up; default: --kinds)")
    parser.add_argument("--lr-floor", type=float, default=0.05, help="final learning rate / peak")
    for name in STUDY_MODEL:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=STUDY_MODEL[name])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    facts = train(
        args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, turns=args.turns, seed=args.seed, eval_every=args.eval_every,
        eval_size=args.eval_size, test_size=args.test_size, threads=args.threads,
        model_options={name: getattr(args, name) for name in STUDY_MODEL}, kinds=args.kinds,
        recipe=args.recipe, frames=args.frames, lr_floor=args.lr_floor, train_kinds=args.train_kinds,
    )
    print(format_report(facts["test"], f"test split after {facts['settings']['steps']} steps "
                        f"({facts['train_wall_seconds'] / 60:.1f} min)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
