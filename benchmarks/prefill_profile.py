"""Where a patched prefill's time goes on a GPU: device busy time, host waits, top kernels.

benchmarks/prefill.py measures how much faster a patched prefill is; this script says why it is
not faster still. For each configuration of prefill.py, on the same random-weight model and
prompt, one profiled prefill (after warm-ups) reports:

- wall time, and the time the GPU spent in kernels (the sum of kernel durations from
  ``torch.profiler``): wall minus busy is time the GPU waited for the host;
- the synchronizing CUDA calls the prefill made (``torch.cuda.set_sync_debug_mode``): each one
  makes the host wait until the GPU has drained its queue, after which the GPU idles while
  the host queues the next kernels. Where they come from, by source line;
- the kernels that took the most GPU time in one configuration (``--kernels-of``, ``--top``).

    python benchmarks/prefill_profile.py --size 7b          # GPU
    python benchmarks/prefill_profile.py --quick            # CPU smoke run (no GPU figures)
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefill import CONFIGS, SIZES, build_model  # noqa: E402

from aim import apply_aim, remove_aim  # noqa: E402
from aim.tiny import make_inputs  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prefill(model, inputs: dict) -> None:
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)


def _device_time_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def sync_sites(model, inputs: dict) -> collections.Counter:
    """Synchronizing CUDA calls of one prefill, counted by the innermost source line in this
    repository or transformers (where the call was made from)."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if REPO in f.filename or "transformers" in f.filename]
        where = frames[-1] if frames else None
        sites[f"{Path(where.filename).name}:{where.lineno} {where.line}" if where else f"{filename}:{lineno}"] += 1

    previous = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _prefill(model, inputs)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous
    return sites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, a smoke run")
    parser.add_argument("--size", choices=["0.5b", "7b"], default="0.5b")
    parser.add_argument("--kernels-of", default="merge+prune", choices=list(CONFIGS),
                        help="the configuration whose kernels are listed (default %(default)s)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed")
    parser.add_argument("--sites", type=int, default=4, help="sync sites listed per configuration")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = "quick" if args.quick else args.size
    _, _, frames, text_tokens = SIZES[size]
    model = build_model(size, "sdpa", dtype, device)
    inputs = make_inputs(model, kind="video", num_frames=frames, text_lengths=(text_tokens,), seed=0)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, {dtype}, {size} preset, {inputs['input_ids'].shape[1]} input tokens")
    print(f"{'config':18} {'wall ms':>9} {'GPU busy ms':>12} {'GPU idle':>9} {'syncs':>6}")
    profiles = {}
    try:
        for config_name, config in CONFIGS.items():
            apply_aim(model, config)
            for _ in range(2):
                _prefill(model, inputs)
            _sync(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                _prefill(model, inputs)
                _sync(device)
                wall_ms = (time.perf_counter() - t0) * 1e3
            events = prof.key_averages()
            busy_ms = sum(_device_time_us(e) for e in events if e.device_type.name == "CUDA") / 1e3
            sites = sync_sites(model, inputs) if device == "cuda" else collections.Counter()
            idle = f"{1 - busy_ms / wall_ms:.0%}" if device == "cuda" else "-"
            print(f"{config_name:18} {wall_ms:>9.1f} {busy_ms:>12.1f} {idle:>9} {sum(sites.values()):>6}")
            for site, count in sites.most_common(args.sites):
                print(f"{'':20}{count:>4} x {site}")
            profiles[config_name] = events
    finally:
        remove_aim(model)
    if device == "cuda":
        config_name, events = args.kernels_of, profiles[args.kernels_of]
        kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=_device_time_us, reverse=True)
        total = sum(_device_time_us(e) for e in kernels)
        print(f"\nGPU time by kernel, {config_name} (total {total / 1e3:.1f} ms)")
        for event in kernels[: args.top]:
            print(f"  {_device_time_us(event) / 1e3:8.2f} ms {_device_time_us(event) / total:5.1%} "
                  f"x{event.count:<5} {event.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
