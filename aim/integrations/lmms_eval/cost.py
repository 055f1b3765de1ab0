"""Per-sample cost of an lmms-eval run: visual tokens before / after merging, tokens per LLM layer
and analytic prefill FLOPs, with a summary (means, ratios to the unchanged model, per task).

FLOPs follow aim.flops' convention (``aim.flops.CONVENTION``), applied to the token counts each
layer really processed (``aim.last_stats``). The baseline figure is the same
formula over the prompt's full length at every layer: what the unchanged model computes for the
same prompt. Without ``aim.flops`` only token counts are recorded (``prefill_flops: null``).

This module does not import lmms-eval.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

TERA = 1e12
FLOPS_CONVENTION = "at the token counts each layer processed: "  # + aim.flops.CONVENTION


def _convention() -> str:
    from aim.flops import CONVENTION

    return CONVENTION


@dataclass
class SampleCost:
    """One prefill of one prompt."""

    task: str | None
    doc_id: int | None
    input_tokens: int
    visual_tokens_before_merge: int
    visual_tokens_after_merge: int
    tokens_per_layer: list[int]
    mode: str
    prefill_flops: int | None = None
    baseline_prefill_flops: int | None = None
    # under a budget (`aim.budget`), figures of the prefill this sample was in (its batch shares them):
    # the setting that ran, its predicted cost (the largest over the batch) and the measured time
    prefill: str | None = None  # which prefill (process id and count): several samples of a batch share one
    setting: str | None = None
    predicted_flops_fraction: float | None = None
    predicted_seconds: float | None = None
    measured_seconds: float | None = None

    @property
    def mean_llm_tokens(self) -> float:
        return sum(self.tokens_per_layer) / max(len(self.tokens_per_layer), 1)


def flops_counter(hf_model: Any) -> tuple[Callable[[Sequence[int]], int] | None, str | None]:
    """A function ``tokens_per_layer -> prefill FLOPs`` for `hf_model`, or ``(None, reason)``.

    Hook for aim.flops: it reads the decoder shapes (`aim.flops.load_model(config).llm`) and uses
    its per-token and attention multiply-accumulate counts.
    """
    try:
        from aim import flops as aim_flops
    except ImportError:
        return None, "aim.flops is not available: token counts only"
    try:
        spec = aim_flops.load_model(hf_model.config)
    except Exception as error:  # a model aim.flops cannot read: keep the token counts
        return None, f"aim.flops could not describe this model ({error}): token counts only"

    def count(tokens_per_layer: Sequence[int]) -> int:
        return aim_flops.prefill_flops(spec, list(tokens_per_layer))

    return count, None


# below this many prompt tokens the per-call overheads (Python, kernel launches, the vision tower)
# outweigh what removing tokens saves in wall time (benchmarks/prefill.py: gains show at ~4k tokens)
SMALL_PROMPT_TOKENS = 1000


@dataclass
class CostTracker:
    """Collects `SampleCost` records and summarises them."""

    model: str
    pretrained: str | None
    aim: dict
    num_layers: int | None = None
    counter: Callable[[Sequence[int]], int] | None = None
    flops_note: str | None = None
    samples: list[SampleCost] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    written_to: list[str] = field(default_factory=list)
    _prefills: int = 0  # prefills recorded by this process

    def add_stats(self, stats: Any, tags: Sequence[tuple[str | None, int | None]] | None = None) -> list[SampleCost]:
        """Record every sample of one `aim.AIMStats` (one prefill); `tags` are (task, doc_id) per sample."""
        added = []
        self._prefills += 1
        batch = len(stats.input_tokens)
        tags = list(tags or [])
        if len(tags) != batch:
            tags = [(tags[-1][0] if tags else None, None)] * batch  # the task is shared by a batch
        choice = getattr(stats, "budget", None)  # one choice per prefill: the batch shares it
        chosen = dict(
            prefill=f"{os.getpid()}:{self._prefills}", setting=str(choice["point"]),
            predicted_flops_fraction=float(choice["predicted_flops_fraction"]),
            predicted_seconds=float(choice["predicted_seconds"]), measured_seconds=float(choice["measured_seconds"]),
        ) if choice else {}
        for i in range(batch):
            per_layer = [int(row[i]) for row in stats.tokens_per_layer]
            full = int(stats.input_tokens[i])
            record = SampleCost(
                task=tags[i][0], doc_id=tags[i][1], input_tokens=full,
                visual_tokens_before_merge=int(stats.visual_tokens_before_merge[i]),
                visual_tokens_after_merge=int(stats.visual_tokens_after_merge[i]),
                tokens_per_layer=per_layer, mode=str(stats.mode), **chosen,
            )
            if self.counter is not None:
                record.baseline_prefill_flops = self.counter([full] * len(per_layer))
                # "mask" hides tokens but computes on all of them
                record.prefill_flops = record.baseline_prefill_flops if stats.mode == "mask" else self.counter(per_layer)
            self.samples.append(record)
            added.append(record)
        return added

    def add_failure(self, error: BaseException | str) -> None:
        self.failures.append(str(error) if isinstance(error, str) else f"{type(error).__name__}: {error}")

    # -- summary ----------------------------------------------------------------------------

    @staticmethod
    def _aggregate(samples: Sequence[SampleCost]) -> dict:
        n = len(samples)
        if not n:
            return {"num_samples": 0}

        def mean(values: Sequence[float]) -> float:
            return float(sum(values)) / len(values)

        out = {
            "num_samples": n,
            "mean_input_tokens": mean([s.input_tokens for s in samples]),
            "mean_visual_tokens_before_merge": mean([s.visual_tokens_before_merge for s in samples]),
            "mean_visual_tokens_after_merge": mean([s.visual_tokens_after_merge for s in samples]),
            "mean_llm_tokens_per_layer": mean([s.mean_llm_tokens for s in samples]),
        }
        before = sum(s.visual_tokens_before_merge for s in samples)
        after = sum(s.visual_tokens_after_merge for s in samples)
        out["visual_token_ratio"] = before / after if after else (math.inf if before else 1.0)
        full = sum(s.input_tokens for s in samples)
        processed = sum(s.mean_llm_tokens for s in samples)
        out["llm_token_ratio"] = full / processed if processed else 1.0
        if all(s.prefill_flops is not None for s in samples):
            aim_flops = sum(s.prefill_flops for s in samples)
            base_flops = sum(s.baseline_prefill_flops for s in samples)
            out.update(
                mean_prefill_tflops=aim_flops / n / TERA,
                mean_baseline_prefill_tflops=base_flops / n / TERA,
                prefill_flops_ratio=base_flops / aim_flops if aim_flops else 1.0,
            )
        return out

    def summary(self) -> dict:
        """Means over every sample, ratios to the unchanged model, and the same per task."""
        tasks: dict[str, list[SampleCost]] = {}
        for s in self.samples:
            tasks.setdefault(s.task or "unknown", []).append(s)
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "aim": self.aim,
            "num_llm_layers": self.num_layers,
            **self._aggregate(self.samples),
            "failed_generations": len(self.failures),
            "failures": self.failures[:5],
            "per_task": {task: self._aggregate(samples) for task, samples in sorted(tasks.items())},
            "budget": self._budget_summary(),
            "flops_convention": FLOPS_CONVENTION + _convention() if self.counter is not None else None,
            "flops_note": self.flops_note,
            "ratios": "baseline / this run, for the same prompts (the baseline is the unchanged model: "
                      "every prompt token at every layer); > 1 means this run is cheaper",
        }

    def _budget_summary(self) -> dict | None:
        """Under a budget: the budget, how often each setting ran, and predicted vs measured cost
        (None without one)."""
        budget = self.aim.get("budget")
        if not budget:
            return None
        chosen = [s for s in self.samples if s.setting is not None]
        runs = Counter(s.setting for s in chosen)
        out = {"budget": budget.get("describe"), "samples": len(chosen),
               "settings_run": dict(sorted(runs.items(), key=lambda item: (-item[1], item[0])))}
        if not chosen:
            return out
        n = len(chosen)
        # per sample: the FLOPs fraction predicted for its prefill against the one counted from its tokens
        out["mean_predicted_flops_fraction"] = sum(s.predicted_flops_fraction for s in chosen) / n
        if all(s.prefill_flops is not None and s.baseline_prefill_flops for s in chosen):
            out["mean_flops_fraction"] = sum(s.prefill_flops / s.baseline_prefill_flops for s in chosen) / n
        # per prefill: times (a batch is one prefill, one time)
        prefills = list({s.prefill: s for s in chosen}.values())
        out["prefills"] = len(prefills)
        out["mean_predicted_ms"] = 1000.0 * sum(s.predicted_seconds for s in prefills) / len(prefills)
        out["mean_measured_ms"] = 1000.0 * sum(s.measured_seconds for s in prefills) / len(prefills)
        if budget.get("ms") is not None:
            out["within_budget"] = sum(1000.0 * s.measured_seconds <= budget["ms"] for s in prefills) / len(prefills)
        return out

    def summary_line(self) -> str:
        s = self.summary()
        if not s["num_samples"]:
            return f"[aim] {self.model}: no multimodal prefill recorded yet ({s['failed_generations']} failed generations)"
        budget = s["budget"]
        label = f"budget {budget['budget']}" if budget else ("AIM" if self.aim.get("enabled") else "aim=off")
        text = (
            f"[aim] {self.model} ({label}): {s['num_samples']} samples, "
            f"visual tokens {s['mean_visual_tokens_before_merge']:.1f} -> {s['mean_visual_tokens_after_merge']:.1f} "
            f"(merge), LLM tokens per layer {s['mean_llm_tokens_per_layer']:.1f} of {s['mean_input_tokens']:.1f}"
        )
        if "mean_prefill_tflops" in s:
            text += (
                f", prefill {s['mean_prefill_tflops']:.6g} TFLOPs (unchanged model: "
                f"{s['mean_baseline_prefill_tflops']:.6g}, {s['prefill_flops_ratio']:.2f}x)"
            )
        if budget and budget["settings_run"]:
            shown = list(budget["settings_run"].items())
            text += "; settings run: " + ", ".join(f"{name} x{count}" for name, count in shown[:4]) + (
                f" and {len(shown) - 4} other(s)" if len(shown) > 4 else "")
            if "within_budget" in budget:
                text += f", {budget['within_budget']:.0%} of prefills within the budget"
        if s["failed_generations"]:
            text += f", {s['failed_generations']} FAILED generations: {s['failures'][0]}"
        if s["mean_input_tokens"] < SMALL_PROMPT_TOKENS:
            text += (
                f". Note: at {s['mean_input_tokens']:.0f} tokens per prompt fixed per-call overheads dominate wall time, "
                "so lmms-eval's timings can show AIM slower; compare the tokens and FLOPs above"
            )
        return text

    def write(self, path: str | os.PathLike, samples_path: str | os.PathLike | None = None) -> Path:
        """Write the summary as JSON at `path` (and the per-sample records as JSONL)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        if samples_path is not None:
            samples_path = Path(samples_path)
            with open(samples_path, "w", encoding="utf-8") as f:
                for s in self.samples:
                    f.write(json.dumps(asdict(s)) + "\n")
            summary["samples_file"] = str(samples_path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        if str(path) not in self.written_to:
            self.written_to.append(str(path))
        return path
