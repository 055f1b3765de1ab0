"""Check lmms-eval's ``aim_study`` figures against the study's own evaluation.

    python -m aim.integrations.lmms_eval.study_check OUTDIR [--logs DIR] [--json]

For every lmms-eval run of the task ``aim_study`` found under ``OUTDIR/logs`` (or ``--logs``):
the examples it ran (the first ``n`` of ``OUTDIR/data/aim_study.jsonl``, after lmms-eval's
``--offset``), the checkpoint (``pretrained=``) and the AIM settings it used (the
``aim_cost.aim.config`` the plugin records in the results JSON, or its FLOPs budget and profile,
``aim_cost.aim.budget``; a relative ``pretrained=`` or profile path is read from the working
directory, as lmms-eval read it), then answers the same examples with the
study's predictor (:func:`aim.study.evaluate.predict`, what :func:`aim.study.evaluate.evaluate`
scores) on the same checkpoint patched with the same :class:`aim.AIMConfig`, and prints both,
overall and per question kind. With ``--log_samples`` runs it also compares the answers example by
example. Exit status 1 when a figure or an answer differs, or when no run could be compared
(latency-budget runs, and budget runs batched by lmms-eval, are listed as not compared).

The two decode differently: lmms-eval generates one token greedily over the whole vocabulary,
from the processor's inputs (the clip decoded from its lossless file), one example at a time; the
study takes the argmax of the same position's logits over the closed answer vocabulary, from
:func:`aim.study.model.to_inputs`, in left-padded batches. They agree where the model's greedy
token is an answer word (the trained default model's always is) and batching changes no argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .make_data import STUDY_DATA

TASK = "aim_study"


@dataclass
class Run:
    """One lmms-eval run of ``aim_study``."""

    results_path: Path
    pretrained: str
    aim: dict  # the AIMConfig fields the run used
    offset: int
    n: int
    metrics: dict[str, float]  # lmms-eval's, without the ",none" suffix
    answers: dict[int, str] | None = None  # doc_id (from the file's start) -> generated text (--log_samples)
    label: str = field(default="")
    budget: dict | None = None  # a budgeted run's budget (aim_budget): flops, ms, quantile, profile, interpolate_keeps
    batch_size: str = "1"  # lmms-eval's --batch_size

    def unsupported(self) -> str | None:
        """Why this run cannot be reproduced here (None: it can)."""
        if self.budget is None:
            return None
        if self.budget.get("ms") is not None:
            return "a latency budget's choices depend on the timings of that run (study_check reproduces FLOPs budgets)"
        if self.batch_size != "1":
            return (f"a budget's choice fits every prompt of a batch, and lmms-eval batched these (--batch_size "
                    f"{self.batch_size}) in its own order: run budgets with --batch_size 1 to check them")
        return None


def _model_args(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in str(text).split(",") if "=" in item)


def find_runs(logs: Path) -> list[Run]:
    """The ``aim_study`` runs under ``logs`` (lmms-eval's ``<output_path>/<model>/<date>_results.json``)."""
    runs = []
    for path in sorted(logs.rglob("*_results.json")):
        results = json.loads(path.read_text(encoding="utf-8"))
        if TASK not in results.get("results", {}):
            continue
        cost = results.get("aim_cost")
        if not isinstance(cost, dict) or "aim" not in cost:
            raise ValueError(f"{path}: no aim_cost in the results: run it with an aim model (aim_llava_hf)")
        config = results.get("config", {})
        model_args = _model_args(config.get("model_args", ""))
        pretrained = cost.get("pretrained") or model_args.get("pretrained")
        metrics = {key.split(",")[0]: value for key, value in results["results"][TASK].items()
                   if key.endswith(",none") and "_stderr" not in key and isinstance(value, (int, float))}
        answers = None
        samples = sorted(path.parent.glob(path.name.replace("_results.json", f"_samples_{TASK}.jsonl")))
        if samples:
            answers = {}
            for line in samples[0].read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                answer = row.get("filtered_resps", row.get("resps"))
                while isinstance(answer, list) and answer:
                    answer = answer[0]
                answers[int(row["doc_id"])] = answer
        given = cost["aim"].get("model_args") or {}
        label = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in given.items()) or "aim=on"
        runs.append(Run(
            results_path=path, pretrained=pretrained, aim=cost["aim"]["config"],
            offset=int(config.get("offset") or 0), n=int(results["n-samples"][TASK]["effective"]),
            metrics=metrics, answers=answers, label=label, budget=cost["aim"].get("budget"),
            batch_size=str(config.get("batch_size") or 1),
        ))
    return runs


def read_rows(outdir: Path) -> list[dict]:
    path = outdir / STUDY_DATA
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: write it with `python -m aim.integrations.lmms_eval.make_data {outdir} --study`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def study_figures(run: Run, rows: list[dict], batch_size: int = 16, cache: dict | None = None) -> dict:
    """The study's answers (:func:`aim.study.evaluate.predict`, what ``evaluate`` scores) on the
    run's examples, with the run's checkpoint and AIM settings.

    Returns ``{"predictions": [...], "metrics": {...}}``: the answers in the rows' order, and
    ``accuracy``, ``video_accuracy``, ``image_accuracy`` and one accuracy per kind, as the task
    reports them."""
    from aim import AIMConfig, apply_aim
    from aim.study import data
    from aim.study.evaluate import predict
    from aim.study.model import load_default_model

    cache = {} if cache is None else cache
    if run.pretrained not in cache:
        cache[run.pretrained] = load_default_model(run.pretrained)
    model, processor = cache[run.pretrained]
    reason = run.unsupported()
    if reason:
        raise ValueError(f"{run.results_path}: {reason}")
    if run.budget is not None:
        # one prompt at a time, as lmms-eval ran them: a budget's choice fits every prompt of a batch
        apply_aim(model, budget=run.budget["flops"], profile=run.budget.get("profile"),
                  interpolate_keeps=run.budget.get("interpolate_keeps", True))
        batch_size = 1
    else:
        fields = {k: v for k, v in run.aim.items() if k in AIMConfig.__dataclass_fields__}
        apply_aim(model, AIMConfig(**fields))
    chosen = rows[run.offset: run.offset + run.n]
    examples = [data.make_example(int(row["seed"]), row["kind"]) for row in chosen]
    for row, example in zip(chosen, examples):  # the file's questions are the study's
        if (example.question, example.answer) != (row["question"], row["answer"]):
            raise ValueError(f"{row['id']}: the data file does not match aim.study.data (regenerate it)")
    predictions = predict(model, processor, examples, batch_size)
    per = defaultdict(list)
    for row, answer in zip(chosen, predictions):
        correct = float(answer == row["answer"])
        for key in ("accuracy", f"{row['modality']}_accuracy", row["kind"]):
            per[key].append(correct)
    return {"predictions": predictions, "metrics": {key: sum(v) / len(v) for key, v in per.items()}}


def compare(outdir: str | Path, logs: str | Path | None = None, batch_size: int = 16) -> list[dict]:
    """Every ``aim_study`` run under ``logs`` (default ``OUTDIR/logs``) next to the study's figures."""
    outdir = Path(outdir)
    logs = Path(logs) if logs is not None else outdir / "logs"
    rows = read_rows(outdir)
    runs = find_runs(logs)
    if not runs:
        raise FileNotFoundError(f"no lmms-eval results of {TASK} under {logs}")
    cache: dict = {}
    report = []
    for run in runs:
        reason = run.unsupported()
        if reason:
            report.append({"results": str(run.results_path), "run": run.label, "skipped": reason})
            continue
        study = study_figures(run, rows, batch_size, cache)
        keys = [k for k in ("accuracy", "video_accuracy", "image_accuracy", *_kinds()) if k in study["metrics"]]
        differing = [k for k in keys if abs(run.metrics.get(k, float("nan")) - study["metrics"][k]) > 1e-9]
        answers = None
        if run.answers is not None:
            chosen = rows[run.offset: run.offset + run.n]
            # lmms-eval numbers the documents from the start of the file, --offset included
            answers = [
                {"id": row["id"], "lmms_eval": run.answers.get(run.offset + i), "study": p}
                for i, (row, p) in enumerate(zip(chosen, study["predictions"]))
                if str(run.answers.get(run.offset + i, "")).strip().lower() != p
            ]
        report.append({
            "results": str(run.results_path), "run": run.label, "pretrained": run.pretrained, "n": run.n,
            "lmms_eval": {k: run.metrics.get(k) for k in keys}, "study": {k: study["metrics"][k] for k in keys},
            "differing_metrics": differing, "differing_answers": answers,
        })
    return report


def _kinds() -> tuple[str, ...]:
    from aim.study import data

    return data.KINDS


def format_report(report: list[dict]) -> str:
    """One table: a row per metric, a column per run, each cell ``lmms-eval / study``; then the
    runs that could not be reproduced, and why."""
    skipped = [entry for entry in report if "skipped" in entry]
    report = [entry for entry in report if "skipped" not in entry]
    if not report:
        return "\n".join([f"{entry['run']}: not compared: {entry['skipped']} ({entry['results']})" for entry in skipped]
                         + ["no run compared"])
    width = max(15, *(len(entry["run"]) for entry in report))
    metrics = list(dict.fromkeys(key for entry in report for key in entry["lmms_eval"]))
    lines = ["accuracy: lmms-eval / aim.study.evaluate, same examples and settings",
             f"{'':<18}" + "".join(f"  {entry['run']:>{width}}" for entry in report),
             f"{'examples':<18}" + "".join(f"  {entry['n']:>{width}}" for entry in report)]

    def cell(entry: dict, key: str) -> str:
        if key not in entry["lmms_eval"]:
            return ""
        mine, theirs = entry["lmms_eval"][key], entry["study"][key]
        text = f"{'-' if mine is None else f'{mine:.3f}'} / {theirs:.3f}"
        return text + (" !" if key in entry["differing_metrics"] else "")

    for key in metrics:
        lines.append(f"{key:<18}" + "".join(f"  {cell(entry, key):>{width}}" for entry in report))
    counts = ["not logged" if e["differing_answers"] is None else f"{len(e['differing_answers'])} of {e['n']}"
              for e in report]
    lines.append(f"{'answers differing':<18}" + "".join(f"  {c:>{width}}" for c in counts))
    for entry in report:
        for answer in (entry["differing_answers"] or [])[:10]:
            lines.append(f"  {entry['run']} {answer['id']}: lmms-eval {answer['lmms_eval']!r}, study {answer['study']!r}")
    if any(e["differing_answers"] is None for e in report):
        lines.append("(runs without --log_samples: answers not compared one by one)")
    lines.extend(f"{entry['run']}: {entry['results']}" for entry in report)
    lines.extend(f"{entry['run']}: not compared: {entry['skipped']} ({entry['results']})" for entry in skipped)
    same = all(not e["differing_metrics"] and not e["differing_answers"] for e in report)
    lines.append("lmms-eval and aim.study.evaluate agree" if same else "lmms-eval and aim.study.evaluate DIFFER (marked !)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aim.integrations.lmms_eval.study_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="the make_data --study folder (holds data/aim_study.jsonl)")
    parser.add_argument("--logs", help="where the lmms-eval results are (default OUTDIR/logs)")
    parser.add_argument("--batch-size", type=int, default=16, help="the study's batch size (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    try:
        report = compare(args.outdir, args.logs, args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: {error}\n")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    compared = [e for e in report if "skipped" not in e]
    same = bool(compared) and all(not e["differing_metrics"] and not e["differing_answers"] for e in compared)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
