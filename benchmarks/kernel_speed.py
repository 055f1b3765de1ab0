"""Triton kernels vs torch references: time and peak memory.

    python benchmarks/kernel_speed.py            # defaults: the sizes below, bf16
    python benchmarks/kernel_speed.py --help

Matching (``best_match``, token merging): N visual tokens as frames of 196 tokens
(one group per frame, Na = Nb = 98), plus single-group cases (Na = Nb = N/2).
Importance (``pagerank_importance``, pruning): N tokens, 28 query / 4 KV heads,
head_dim 128 (LLaVA-OneVision-7B / Qwen2-7B).

With CUDA both paths are timed (median of --repeats after a warm-up) and their
peak memory above the inputs is measured (``torch.cuda.max_memory_allocated``);
the reference is skipped where its analytic peak exceeds the free GPU memory.
Without CUDA the kernels cannot run at these sizes (the Triton interpreter is for
tests), so only the torch reference is timed, on the CPU, at the sizes whose
estimated time and memory fit --cpu-budget-s / --cpu-mem-gb; the peak-memory
columns are then the analytic figures of both paths (formulas in docs/kernels.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# the repository root first: lets a checkout run uninstalled. (This script is not named kernels.py:
# its folder is sys.path[0] and would shadow the hub's `kernels` package, which transformers >= 5.25
# imports.)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aim.merge import best_match_reference  # noqa: E402
from aim.prune import pagerank_importance_reference  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is a dependency of aim; keep the script usable without it
    def tqdm(iterable, **_):
        return iterable


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32 = 4


# ----------------------------------------------------------------------------- analytic memory
# Bytes allocated above the inputs at the peak of each path (the formulas of docs/kernels.md).


def matching_reference_bytes(groups: int, num_a: int, num_b: int, dim: int, elem: int = FP32) -> int:
    # at the matmul: fp32 normalised copies of A and B and the (G, Na, Nb) fp32 similarity
    # matrix; for fp16/bf16 inputs, while B is normalised: normalised A, B's fp32 copy and
    # normalised B. Plus the outputs.
    at_matmul = FP32 * groups * (num_a + num_b) * dim + FP32 * groups * num_a * num_b
    at_norm = FP32 * groups * (num_a + 2 * num_b) * dim if elem < FP32 else 0
    return max(at_matmul, at_norm) + 12 * groups * num_a


def matching_kernel_bytes(groups: int, num_a: int, num_b: int, dim: int, elem: int = FP32) -> int:
    return 12 * groups * num_a  # the float32 scores and int64 indices, nothing else


def importance_reference_bytes(batch: int, heads: int, kv_heads: int, n: int, dim: int, elem: int) -> int:
    # at the softmax: the fp32 logits and the softmax output, two (B, H, N, N) tensors; the
    # (B, 1, N, N) bool mask; the scaled fp32 queries (GQA needs no repeated keys)
    return 2 * FP32 * batch * heads * n * n + batch * n * n + FP32 * batch * heads * n * dim


def importance_kernel_bytes(batch: int, heads: int, kv_heads: int, n: int, dim: int, elem: int) -> int:
    # row log-sum-exp and two score buffers (B, H, N) fp32; valid as int8, start mass, result
    return 3 * FP32 * batch * heads * n + batch * n * (1 + FP32 + FP32)


def matching_flops(groups: int, num_a: int, num_b: int, dim: int) -> float:
    return 2.0 * groups * num_a * num_b * dim


def importance_reference_flops(batch: int, heads: int, n: int, dim: int, iterations: int) -> float:
    # dense: Q K^T over the full square, plus `iterations` vector-matrix products
    return 2.0 * batch * heads * n * n * dim + 2.0 * iterations * batch * heads * n * n


def importance_kernel_flops(batch: int, heads: int, n: int, dim: int, iterations: int) -> float:
    # causal half of Q K^T, recomputed once for the log-sum-exp and once per iteration
    return (iterations + 1) * batch * heads * n * n * dim


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    kernel: str  # "matching" or "importance"
    label: str
    shape: dict
    ref_bytes: int
    kernel_bytes: int
    ref_flops: float
    results: dict = field(default_factory=dict)


def matching_cases(tokens: list[int], frame_tokens: int, giant: list[int], dim: int, elem: int) -> list[Case]:
    cases = []
    for n in tokens:
        groups = max(1, n // frame_tokens)
        num_a = (frame_tokens + 1) // 2  # even positions
        label = f"{groups} frames x {frame_tokens}"
        cases.append(_matching_case(label, groups, num_a, frame_tokens - num_a, dim, elem))
    for n in giant:
        cases.append(_matching_case(f"1 group of {n}", 1, (n + 1) // 2, n // 2, dim, elem))
    return cases


def _matching_case(label, groups, num_a, num_b, dim, elem) -> Case:
    shape = dict(groups=groups, num_a=num_a, num_b=num_b, dim=dim)
    return Case(
        "matching",
        label,
        shape,
        matching_reference_bytes(**shape, elem=elem),
        matching_kernel_bytes(**shape, elem=elem),
        matching_flops(**shape),
    )


def importance_cases(tokens: list[int], batch: int, heads: int, kv_heads: int, dim: int, iterations: int, elem: int):
    cases = []
    for n in tokens:
        shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, n=n, dim=dim)
        cases.append(
            Case(
                "importance",
                f"N={n}, {heads}/{kv_heads} heads",
                shape,
                importance_reference_bytes(**shape, elem=elem),
                importance_kernel_bytes(**shape, elem=elem),
                importance_reference_flops(batch, heads, n, dim, iterations),
            )
        )
    return cases


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)

    s = case.shape
    if case.kernel == "matching":
        return (randn(s["groups"], s["num_a"], s["dim"]), randn(s["groups"], s["num_b"], s["dim"])), {}
    valid = torch.ones(s["batch"], s["n"], dtype=torch.bool, device=device)
    valid[:, : s["n"] // 16] = False  # some left padding
    query = randn(s["batch"], s["heads"], s["n"], s["dim"])
    key = randn(s["batch"], s["kv_heads"], s["n"], s["dim"])
    return (query, key, valid), {}


# ----------------------------------------------------------------------------- timing


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, args, kwargs, device: str, repeats: int) -> tuple[float, int | None]:
    """Median seconds over `repeats` calls after one warm-up, and the peak bytes above the inputs (CUDA)."""
    fn(*args, **kwargs)  # warm-up: compilation, allocator
    _sync(device)
    peak = None
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(*args, **kwargs)
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
        del out
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - start)
        del out
    return statistics.median(times), peak


def run_case(case: Case, args, device: str, tracker: dict, bar) -> None:
    ref_fn = best_match_reference if case.kernel == "matching" else pagerank_importance_reference
    kwargs = {} if case.kernel == "matching" else dict(tau=args.tau, iterations=args.iterations)
    res = case.results
    inputs = None
    if device == "cuda" or args.interpret:
        from aim.kernels import best_match_triton, pagerank_importance_triton

        kernel_fn = best_match_triton if case.kernel == "matching" else pagerank_importance_triton
        inputs, _ = make_inputs(case, DTYPES[args.dtype], device)
        bar.set_postfix_str(f"{case.kernel} {case.label}: kernel")
        repeats = args.repeats if device == "cuda" else args.cpu_repeats
        res["kernel_s"], res["kernel_peak"] = measure(kernel_fn, inputs, kwargs, device, repeats)

    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if case.ref_bytes > 0.9 * free:
            res["ref_skip"] = f"needs {gib(case.ref_bytes)} > {gib(free)} free"
        else:
            bar.set_postfix_str(f"{case.kernel} {case.label}: reference")
            try:
                res["ref_s"], res["ref_peak"] = measure(ref_fn, inputs, kwargs, device, args.repeats)
            except torch.OutOfMemoryError:
                res["ref_skip"] = "out of memory"
        del inputs
        torch.cuda.empty_cache()
        return

    # CPU: the reference where the estimate fits the time and memory budgets
    rate = tracker.get(case.kernel)  # FLOP/s measured on the previous case of this kind
    est = case.ref_flops / rate * (args.cpu_repeats + 1) if rate else None
    left = args.cpu_budget_s - tracker["spent"]
    if case.ref_bytes > args.cpu_mem_gb * 2**30:
        res["ref_skip"] = f"needs {gib(case.ref_bytes)} > --cpu-mem-gb {args.cpu_mem_gb:g}"
        return
    if est is not None and est > left:
        res["ref_skip"] = f"est. {est:.0f} s > {max(left, 0):.0f} s budget left"
        return
    bar.set_postfix_str(f"{case.kernel} {case.label}: reference (CPU)")
    if inputs is None:
        inputs, _ = make_inputs(case, DTYPES[args.dtype], "cpu")
    start = time.perf_counter()
    res["ref_s"], _ = measure(ref_fn, inputs, kwargs, "cpu", args.cpu_repeats)
    tracker["spent"] += time.perf_counter() - start
    tracker[case.kernel] = case.ref_flops / max(res["ref_s"], 1e-9)


# ----------------------------------------------------------------------------- report


def gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def seconds(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(row):  # text columns left, figures right
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def report(cases: list[Case], device: str) -> str:
    out = []
    for kind in ("matching", "importance"):
        rows = []
        for c in (c for c in cases if c.kernel == kind):
            r = c.results
            names = ("G=groups", "Na=num_a", "Nb=num_b", "d=dim") if kind == "matching" else (
                "B=batch", "H=heads", "Hkv=kv_heads", "N=n", "d=dim")
            shape = " ".join(f"{k}={c.shape[v]}" for k, v in (n.split("=") for n in names))
            ref_t = seconds(r.get("ref_s")) if "ref_s" in r else f"skipped ({r.get('ref_skip', '-')})"
            ker_t = seconds(r.get("kernel_s")) if "kernel_s" in r else "needs a GPU"
            timed = "ref_s" in r and "kernel_s" in r and device == "cuda"  # interpreter times are no timings
            speed = f"{r['ref_s'] / r['kernel_s']:.1f}x" if timed else "-"
            ratio = f"{c.ref_bytes / c.kernel_bytes:,.0f}x"
            row = [c.label, shape, ref_t, ker_t, speed, gib(c.ref_bytes), gib(c.kernel_bytes), ratio]
            if device == "cuda":
                rp, kp = r.get("ref_peak"), r.get("kernel_peak")
                row += [gib(rp) if rp is not None else "-", gib(kp) if kp is not None else "-"]
                row.append(f"{rp / max(kp, 1):,.0f}x" if rp is not None and kp is not None else "-")
            rows.append(row)
        if not rows:
            continue
        header = ["case", "shape", "torch time", "triton time", "speed-up", "torch peak*", "triton peak*", "mem ratio*"]
        if device == "cuda":
            header += ["torch peak (meas.)", "triton peak (meas.)", "mem ratio (meas.)"]
        title = "best_match (token merging)" if kind == "matching" else "pagerank_importance (token pruning)"
        out += [f"\n{title}", table(rows, header)]
    out.append("\n* analytic bytes above the inputs at each path's peak (formulas: docs/kernels.md)")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--only", choices=["matching", "importance"], help="run one kernel's cases")
    p.add_argument("--matching-tokens", type=int, nargs="*", default=[3136, 12544, 50176, 200704],
                   help="visual tokens split into frames of --frame-tokens")
    p.add_argument("--frame-tokens", type=int, default=196)
    p.add_argument("--giant-group", type=int, nargs="*", default=[4096, 32768, 200704],
                   help="visual tokens in one single group (Na = Nb = N/2)")
    p.add_argument("--dim", type=int, default=3584, help="token feature size for matching (LLM hidden size)")
    p.add_argument("--importance-tokens", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per case on CUDA")
    p.add_argument("--cpu-repeats", type=int, default=1, help="timed calls per case on CPU")
    p.add_argument("--cpu-budget-s", type=float, default=45.0, help="CPU time for the torch reference, all cases")
    p.add_argument("--cpu-mem-gb", type=float, default=2.0, help="largest analytic reference peak run on CPU")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: also run the kernels through the Triton interpreter (very slow: tiny sizes only, "
                        "a smoke test of this script, not a timing)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and (args.interpret or os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("--interpret / TRITON_INTERPRET=1 are for CPU runs: unset them to time the compiled kernels")
    if args.interpret:
        if "triton" in sys.modules:
            sys.exit("--interpret: triton was imported before TRITON_INTERPRET could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    elem = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    cases = []
    if args.only in (None, "matching"):
        cases += matching_cases(args.matching_tokens, args.frame_tokens, args.giant_group, args.dim, elem)
    if args.only in (None, "importance"):
        cases += importance_cases(args.importance_tokens, args.batch, args.heads, args.kv_heads, args.head_dim,
                                  args.iterations, elem)
    cases.sort(key=lambda c: (c.kernel, c.ref_flops))  # small first: CPU estimates come from measurements

    if device == "cuda":
        name = torch.cuda.get_device_name()
        print(f"device: {name}, dtype {args.dtype}, median of {args.repeats} calls after a warm-up")
    elif args.interpret:
        print(
            f"device: CPU ({torch.get_num_threads()} threads), dtype {args.dtype}, kernels under the Triton "
            "interpreter: a smoke test of this script; its kernel times say nothing about a GPU"
        )
    else:
        threads = torch.get_num_threads()
        print(
            f"device: CPU ({threads} threads), dtype {args.dtype}. No CUDA: the Triton kernels are not timed "
            f"(GPU timings need a GPU; on CPU they only run under TRITON_INTERPRET=1, for tests). The torch "
            f"reference runs on the CPU where its analytic peak is <= {args.cpu_mem_gb:g} GiB and the estimated "
            f"time fits a {args.cpu_budget_s:g} s budget (estimated from the previous case's FLOP rate)."
        )
    tracker = {"spent": 0.0}
    start = time.perf_counter()
    bar = tqdm(cases, desc="cases", file=sys.stderr, leave=False)
    for case in bar:
        run_case(case, args, device, tracker, bar)
    print(report(cases, device))
    if device == "cpu":
        for kind in ("matching", "importance"):
            if kind in tracker:
                print(f"CPU reference rate ({kind}, last case run): {tracker[kind] / 1e9:.1f} GFLOP/s")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
