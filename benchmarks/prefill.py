"""Measured prefill time / memory / KV cache of baseline vs AIM, next to the analytic FLOPs ratio.

A real ``transformers`` LlavaOnevisionForConditionalGeneration with random weights (no download):
by default a Qwen2-0.5B-shaped LLM (hidden 896, MLP 4864, 24 layers, 14 heads, 2 KV heads) behind
a small SigLIP tower, fed one video of 16 frames x 256 tokens + 100 text tokens (4197 tokens).
Each configuration runs on the same model instance (``apply_aim`` re-configures it; the baseline
is ``apply_aim(model, enabled=False)``, the unchanged forward):

    baseline      no merging, no pruning
    merge-only    AIMConfig(prune=False): each frame merged to 25%
    merge+prune   AIMConfig(): the paper's defaults (merge to 25%, prune from half depth)
    temporal+merge  AIMConfig(temporal_keep=0.5, prune=False): each later frame first keeps the half
                  of its tokens least like the frame before (the rest merge into it), then each
                  frame is merged to 25% of what it kept
    frames 0.5+merge  AIMConfig(frame_keep=0.5, prune=False): the vision tower encodes half of the
                  frames (evenly spaced), each merged to 25%: the vision tower's time falls too

For each: prefill wall time (median of ``--repeats`` after ``--warmup`` runs) end to end and of the
LLM part alone (the text decoder's forward, which includes AIM's merging and importance work),
input tokens/s, peak memory, and the KV-cache bytes read from the cache the prefill returned;
then the analytic FLOPs ratio from ``aim.flops`` for this exact config and the ratio
``measured speedup / analytic ratio``. The issue's goal: measured prefill speedup >= 0.8x the
analytic FLOPs ratio at 4k+ input tokens.

Peak memory: on GPU ``torch.cuda.max_memory_allocated`` above what was allocated before the
prefill; on CPU the process's peak resident set size (RSS) above its RSS before the prefill,
sampled every millisecond from /proc/self/statm (glibc's mmap threshold is pinned so freed
tensors go back to the OS and each run starts from a comparable RSS).

    python benchmarks/prefill.py              # default (CPU: a few minutes on 2 cores)
    python benchmarks/prefill.py --size 7b    # Qwen2-7B / SigLIP-so400m shapes, 32 frames x 196 (GPU)
    python benchmarks/prefill.py --quick      # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers as tf  # noqa: E402

from aim import AIMConfig, apply_aim, last_stats, remove_aim  # noqa: E402
from aim import flops as F  # noqa: E402
from aim.compat import output_cache  # noqa: E402
from aim.tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VIDEO_ID, make_inputs  # noqa: E402

CONFIGS = {
    "baseline": AIMConfig(enabled=False),
    "merge-only": AIMConfig(prune=False),
    "merge+prune": AIMConfig(),
    "temporal+merge": AIMConfig(temporal_keep=0.5, prune=False),
    "frames 0.5+merge": AIMConfig(frame_keep=0.5, prune=False),
}
GOAL = 0.8  # measured speedup >= GOAL x analytic ratio
MiB = 2**20

SIZES = {
    # name: (text config, vision config, frames, text tokens)
    "quick": (
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             image_size=112, patch_size=14),  # 8x8 patches -> 4x4 = 16 tokens per frame
        8, 32,
    ),
    "0.5b": (
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             image_size=448, patch_size=14),  # 32x32 patches -> 16x16 = 256 tokens per frame
        16, 100,
    ),
    "7b": ("builtin", "builtin", 32, 100),  # aim/model_configs/llava-onevision-qwen2-7b: 196 tokens per frame
}


def build_model(size: str, attn: str, dtype: torch.dtype, device: str, seed: int = 0):
    """The random-weight LLaVA-OneVision model of a size preset, in eval mode on `device`."""
    text, vision, _, _ = SIZES[size]
    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if text == "builtin":
        config = tf.AutoConfig.from_pretrained(F.MODEL_CONFIG_DIR / "llava-onevision-qwen2-7b")
        config.image_token_id = config.image_token_index = IMAGE_ID
        config.video_token_id = config.video_token_index = VIDEO_ID
    else:
        config = tf.LlavaOnevisionConfig(
            text_config=tf.Qwen2Config(use_sliding_window=False, max_position_embeddings=32768, **text, **ids),
            vision_config=tf.SiglipVisionConfig(vision_use_head=False, **vision),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
            vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=[[vision["image_size"]] * 2],
        )
    for name, value in ids.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator on GPU, sampled RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # no /proc: lifetime peak from getrusage (KiB on Linux)
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _trim()
            self.start = self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())
        self.delta = self.peak - self.start


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _pin_mmap_threshold() -> None:
    """Large frees go straight back to the OS (glibc only), so sampled RSS tracks live memory."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, which also turns off its dynamic growth


def _trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PrefillTimer:
    """Times prefills of one model: end to end, the LLM part (the text decoder's forward), and
    on CPU the process CPU time (less sensitive than wall time to other load on a shared machine)."""

    def __init__(self, model, device: str) -> None:
        self.device = device
        llm = model.model.language_model
        self.marks: dict[str, float] = {}
        self.handles = [llm.register_forward_pre_hook(self._start), llm.register_forward_hook(self._stop)]

    def _start(self, *args) -> None:
        _sync(self.device)
        self.marks["llm_start"] = time.perf_counter()

    def _stop(self, *args) -> None:
        _sync(self.device)
        self.marks["llm_stop"] = time.perf_counter()

    def prefill(self, model, inputs: dict) -> dict:
        with torch.inference_mode(), PeakMemory(self.device) as memory:
            _sync(self.device)
            cpu0, t0 = time.process_time(), time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(self.device)
            t1, cpu1 = time.perf_counter(), time.process_time()
        cache = output_cache(out)
        kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return {
            "total_s": t1 - t0,
            "llm_s": self.marks["llm_stop"] - self.marks["llm_start"],
            "cpu_s": cpu1 - cpu0,
            "peak_memory_bytes": memory.delta,
            "kv_cache_bytes": kv_bytes,
        }

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def run(size: str = "0.5b", frames: int | None = None, text_tokens: int | None = None, repeats: int = 2,
        warmup: int = 1, device: str | None = None, dtype: str | None = None, attn: str = "sdpa") -> dict:
    """Build the model and inputs, then time every configuration. Warm-up runs use a 2-frame prompt
    (same code paths, a fraction of the cost); timed runs go round-robin over the configurations so
    that a change of load on the machine hits them alike."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    torch_dtype = getattr(torch, dtype)
    _, _, default_frames, default_text = SIZES[size]
    frames = frames or default_frames
    text_tokens = default_text if text_tokens is None else text_tokens
    if not device.startswith("cuda"):
        _pin_mmap_threshold()

    t0 = time.perf_counter()
    model = build_model(size, attn, torch_dtype, device)
    inputs = make_inputs(model, kind="video", num_frames=frames, text_lengths=(text_tokens,), seed=0)
    short = make_inputs(model, kind="video", num_frames=min(frames, 2), text_lengths=(text_tokens,), seed=1)
    build_s = time.perf_counter() - t0
    n_tokens = int(inputs["input_ids"].shape[1])
    spec = F.load_model(model.config)
    described = F.video_input(spec, frames, text_tokens=text_tokens)
    if described.total_tokens != n_tokens:
        raise RuntimeError(f"analytic input has {described.total_tokens} tokens, the prompt {n_tokens}")

    timer = PrefillTimer(model, device)
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    stats = {}
    t0 = time.perf_counter()
    try:
        for name, config in CONFIGS.items():
            apply_aim(model, config)
            for _ in range(warmup):
                timer.prefill(model, short)
        for _ in range(repeats):
            for name, config in CONFIGS.items():
                apply_aim(model, config)
                runs[name].append(timer.prefill(model, inputs))
                stats[name] = last_stats(model)
    finally:
        timer.close()
        remove_aim(model)
    timed_s = time.perf_counter() - t0

    rows = {}
    for name, config in CONFIGS.items():
        analytic = F.estimate(spec, described, config if config.enabled else None, dtype=dtype)
        causal = F.estimate(spec, described, config if config.enabled else None, dtype=dtype, attention="causal")
        measured = runs[name]
        row = {key: statistics.median(r[key] for r in measured) for key in ("total_s", "llm_s", "cpu_s")}
        rows[name] = {
            **row,
            "total_runs_s": [r["total_s"] for r in measured],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in measured),
            "kv_cache_bytes": measured[-1]["kv_cache_bytes"],
            "tokens_per_s": n_tokens / row["total_s"],
            "llm_tokens_first_last_layer": [stats[name].tokens_per_layer[0][0], stats[name].tokens_per_layer[-1][0]],
            "analytic_prefill_flops": analytic.prefill_flops,
            "analytic_prefill_flops_causal": causal.prefill_flops,
            "analytic_kv_cache_bytes": analytic.kv_cache_bytes,
            "analytic_vision_flops": analytic.vision_flops or 0,
        }

    base = rows["baseline"]
    for row in rows.values():
        row["analytic_ratio"] = base["analytic_prefill_flops"] / row["analytic_prefill_flops"]
        row["analytic_ratio_causal"] = base["analytic_prefill_flops_causal"] / row["analytic_prefill_flops_causal"]
        row["analytic_ratio_end_to_end"] = (base["analytic_prefill_flops"] + base["analytic_vision_flops"]) / (
            row["analytic_prefill_flops"] + row["analytic_vision_flops"])
        row["speedup_llm"] = base["llm_s"] / row["llm_s"]
        row["speedup_end_to_end"] = base["total_s"] / row["total_s"]
        row["speedup_cpu_time"] = base["cpu_s"] / row["cpu_s"]
        row["speedup_over_analytic"] = row["speedup_llm"] / row["analytic_ratio"]
        row["speedup_over_analytic_causal"] = row["speedup_llm"] / row["analytic_ratio_causal"]
        row["speedup_over_analytic_end_to_end"] = row["speedup_end_to_end"] / row["analytic_ratio_end_to_end"]
    llm = spec.llm
    vision = model.config.vision_config
    return {
        "model": (f"LlavaOnevisionForConditionalGeneration, random weights; LLM {llm.num_layers} layers, hidden "
                  f"{llm.hidden_size}, MLP {llm.intermediate_size}, {llm.num_heads} heads / {llm.num_kv_heads} KV "
                  f"heads; SigLIP {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
                  f"{vision.image_size} px"),
        "size": size,
        "input": f"{described.description} = {n_tokens} tokens",
        "input_tokens": n_tokens,
        "device": _device_name(device),
        "dtype": dtype,
        "attn": attn,
        "repeats": repeats,
        "warmup": warmup,
        "build_s": build_s,
        "timed_s": timed_s,
        "memory": "torch.cuda.max_memory_allocated above the pre-prefill allocation" if device.startswith("cuda")
        else "peak RSS above the pre-prefill RSS, sampled every 1 ms from /proc/self/statm",
        "rows": rows,
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def format_result(result: dict) -> str:
    rows = result["rows"]
    names = list(rows)
    width = max(14, *(len(n) + 2 for n in names))  # one column per configuration
    lines = [
        f"Model   {result['model']}",
        f"Input   {result['input']}",
        f"Device  {result['device']}, {result['dtype']}, attn={result['attn']}; median of {result['repeats']} "
        f"run(s) per configuration (round-robin) after {result['warmup']} short warm-up run(s) each",
        f"Memory  {result['memory']}",
        "",
        f"{'':<38}" + "".join(f"{n:>{width}}" for n in names),
    ]

    def line(label, fmt, key=None, fn=None):
        values = [fn(rows[n]) if fn else rows[n][key] for n in names]
        lines.append(f"{label:<38}" + "".join(f"{fmt.format(v):>{width}}" for v in values))

    line("LLM tokens, first / last layer", "{}", fn=lambda r: "{} / {}".format(*r["llm_tokens_first_last_layer"]))
    line("prefill time, end to end (s)", "{:.3f}", "total_s")
    line("  of which LLM part (s)", "{:.3f}", "llm_s")
    line("process CPU time (s)", "{:.3f}", "cpu_s")
    line("input tokens / s", "{:.0f}", "tokens_per_s")
    line("peak memory (MiB)", "{:.1f}", fn=lambda r: r["peak_memory_bytes"] / MiB)
    line("KV cache, measured (MiB)", "{:.2f}", fn=lambda r: r["kv_cache_bytes"] / MiB)
    line("KV cache, analytic (MiB)", "{:.2f}", fn=lambda r: r["analytic_kv_cache_bytes"] / MiB)
    line("analytic LLM prefill (GFLOPs)", "{:.1f}", fn=lambda r: r["analytic_prefill_flops"] / 1e9)
    line("analytic FLOPs ratio, LLM (paper)", "{:.2f}x", "analytic_ratio")
    line("analytic ratio, LLM, causal attention", "{:.2f}x", "analytic_ratio_causal")
    line("measured speedup, LLM", "{:.2f}x", "speedup_llm")
    line("measured / analytic, LLM (paper)", "{:.2f}", "speedup_over_analytic")
    line("measured / analytic, LLM (causal)", "{:.2f}", "speedup_over_analytic_causal")
    line("analytic ratio, end to end (+vision)", "{:.2f}x", "analytic_ratio_end_to_end")
    line("measured speedup, end to end", "{:.2f}x", "speedup_end_to_end")
    line("measured / analytic, end to end", "{:.2f}", "speedup_over_analytic_end_to_end")
    line("speedup in process CPU time", "{:.2f}x", "speedup_cpu_time")
    lines.append("")
    big = result["input_tokens"] >= 4096
    for name in names[1:]:
        row = rows[name]
        met = row["speedup_over_analytic"] >= GOAL
        lines.append(
            f"Goal ({name}): measured LLM prefill speedup {row['speedup_llm']:.2f}x >= {GOAL} x analytic "
            f"{row['analytic_ratio']:.2f}x = {GOAL * row['analytic_ratio']:.2f}x: {'MET' if met else 'NOT MET'}"
            + ("" if big else f" (input has {result['input_tokens']} < 4096 tokens: the goal is stated for 4k+)")
            + f"; against the causal-attention ratio {row['analytic_ratio_causal']:.2f}x: "
            + ("met" if row["speedup_over_analytic_causal"] >= GOAL else "not met")
        )
    lines.append(f"(model build and inputs {result['build_s']:.1f} s; timed runs {result['timed_s']:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["0.5b", "7b"], default="0.5b", help="model shape (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny model and input: a smoke run in seconds")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: 16; 32 for 7b; 8 quick)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 100)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per configuration, median reported (default: 2 on CPU, 5 on GPU, 2 quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights / activations (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.frames is not None and not 1 <= args.frames <= 256:
        parser.error("--frames must be between 1 and 256")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    size = "quick" if args.quick else args.size
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    repeats = args.repeats or (5 if on_gpu and not args.quick else 2)
    result = run(size, args.frames, args.text_tokens, repeats, args.warmup, args.device, args.dtype, args.attn)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
