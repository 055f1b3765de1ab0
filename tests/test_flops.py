"""The analytic FLOPs model: the paper's figures, the shipped configs, honesty against
torch's FLOP counter on real (tiny) models, bad inputs, and the ``aim flops`` CLI."""

import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim import flops as F
from aim.config import visual_tokens_kept
from aim.flops_cli import main as flops_main
from aim.tiny import build_tiny_model, make_inputs

OV = "llava-onevision-qwen2-7b"


def rel(a, b):
    return abs(a - b) / abs(b)


# --- the paper (LLaVA-OneVision-7B, 32 frames x 196 tokens, ~100 text tokens) ---------------


def test_paper_prefill_tflops_within_one_percent():
    report = F.compare(OV, F.video_input(OV, frames=32, tokens_per_frame=196, text_tokens=100))
    assert rel(report.baseline.prefill_tflops, 99.63) < 0.01
    assert rel(report.aim.prefill_tflops, 14.76) < 0.01
    assert 6.6 < report.prefill_ratio < 6.9  # "6.8x fewer"


def test_paper_schedule_tokens_per_layer():
    report = F.estimate(OV, F.video_input(OV, 32, 196, 100), AIMConfig())
    tokens = report.tokens_per_layer
    visual = 32 * 49 + 1  # 196 -> 98 -> 49 per frame, plus the video newline
    assert report.visual_tokens_in_llm == visual
    assert tokens[:14] == [100 + visual] * 14
    assert tokens[14] == 100 + visual_tokens_kept(visual, 0.875)
    assert tokens[20] == 100 + visual_tokens_kept(visual, 0.125)
    assert tokens[21:] == [100] * 7
    layer = report.layers[0]
    assert layer.kv_cache_bytes == (100 + visual) * 2 * 4 * 128 * 2  # K+V, 4 KV heads, head_dim 128, bf16


def test_decode_and_vision_are_reported_separately():
    report = F.compare(OV, F.video_input(OV, 32))
    base, aim = report.baseline, report.aim
    assert base.vision_flops == aim.vision_flops > 0  # merging happens after the tower
    assert base.decode_flops_per_token > aim.decode_flops_per_token
    per_token = 2 * F.load_model(OV).llm.linear_macs_per_token()
    assert base.layers[0].decode_flops > per_token  # attention over the cache on top of the projections
    json.dumps(report.as_dict())  # JSON-ready


def test_causal_attention_counts_the_lower_triangle():
    llm = F.load_model(OV).llm
    assert llm.attention_macs(10, 10, causal=True) == 2 * 55 * llm.num_heads * llm.head_dim
    assert llm.attention_macs(1, 10, causal=True) == llm.attention_macs(1, 10)  # a decode step sees every key
    full = F.compare(OV, F.video_input(OV, 32))
    causal = F.compare(OV, F.video_input(OV, 32), attention="causal")
    assert causal.baseline.prefill_flops < full.baseline.prefill_flops
    n = full.baseline.input.total_tokens
    assert causal.baseline.layers[0].attention_flops * 2 * n == full.baseline.layers[0].attention_flops * (n + 1)
    assert causal.baseline.kv_cache_bytes == full.baseline.kv_cache_bytes
    assert causal.prefill_ratio < full.prefill_ratio  # the quadratic term AIM saves most on is halved


# --- shipped configs and config sources ------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape",
    [
        (OV, (3584, 18944, 28, 28, 4, 128)),
        ("qwen2-vl-7b", (3584, 18944, 28, 28, 4, 128)),
        ("llava-1.5-7b", (4096, 11008, 32, 32, 32, 128)),
        ("llava-next-video-7b", (4096, 11008, 32, 32, 32, 128)),
    ],
)
def test_builtin_configs(name, shape):
    assert name in F.builtin_models()
    spec = F.load_model(name)
    m = spec.llm
    assert (m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == shape
    assert spec.vision is not None


def test_builtin_defaults_and_qwen_frame_pairs():
    assert F.video_input(OV, 8).visual_groups == (196,) * 8
    assert F.video_input("llava-next-video-7b", 8).visual_groups == (144,) * 8
    assert F.image_input("llava-1.5-7b", 1).visual_groups == (576,)
    qwen = F.video_input("qwen2-vl-7b", 31, tokens_per_frame=256)
    assert qwen.visual_groups == (256,) * 16 and qwen.marker_tokens == 0  # ceil(31 / 2) temporal slices
    assert F.load_model("qwen2-vl-7b").vision.hidden_size == 1280  # embed_dim, not the merger's output


def test_config_sources_agree(tmp_path):
    path = F.MODEL_CONFIG_DIR / OV / "config.json"
    data = json.loads(path.read_text())
    from transformers import AutoConfig

    specs = [F.load_model(x) for x in (OV, path, path.parent, data, AutoConfig.from_pretrained(path.parent))]
    assert len({s.llm for s in specs}) == 1
    assert F.load_model(specs[0]) is specs[0]


def test_explicit_head_dim_and_gqa():
    base = {"model_type": "custom", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    plain = F.load_model(base).llm
    assert (plain.head_dim, plain.num_kv_heads) == (16, 4)
    wide = F.load_model({"text_config": {**base, "head_dim": 32, "num_key_value_heads": 2}, "model_type": "custom"}).llm
    assert (wide.head_dim, wide.num_kv_heads) == (32, 2)
    # q/o: 64 x 4*32 each, k/v: 64 x 2*32 each, MLP: 3 x 64 x 128
    assert wide.linear_macs_per_token() == 2 * 64 * 128 + 2 * 64 * 64 + 3 * 64 * 128
    assert wide.attention_macs(10, 10) == 2 * 10 * 10 * 4 * 32


# --- honesty: analytic == what torch counts inside the decoder layers of real models ---------

_aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # torch counts GPU sdpa kernels as QK^T + AV over every (query, key) pair (causality ignored);
    # the CPU flash kernel has no formula, so count it the same way
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


FLOP_MAP = {_aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
DECODER_LAYER = re.compile(r"\.language_model\.layers\.\d+$")  # e.g. Llava...Generation.model.language_model.layers.3


def counted_decoder_flops(model, inputs):
    """FLOPs torch counts inside the LLM decoder layers (the layer modules only: AIM's merging and
    importance run outside them, like the LM head and the vision tower)."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_MAP)
    with torch.no_grad(), counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    layers = [sum(ops.values()) for name, ops in counts.items() if DECODER_LAYER.search(name)]
    assert len(layers) == len(model.model.language_model.layers)
    return sum(layers)


NUM_LAYERS = 4
AIM_CFG = AIMConfig(merge_keep=0.5, prune_start=1, prune_step=0.25)  # layers keep 1, .75, .5, .25 of the merged visual


def _described(family, model, inputs):
    """The analytic description of the tiny inputs, from the known token layouts."""
    n = inputs["input_ids"].shape[1]
    if family == "llava":  # 48 px / patch 8: 6x6 = 36 tokens, one group
        return F.image_input(model.config, 1, text_tokens=n - 36)
    if family == "llava_next":
        # 48x72 image: base view 6x6 = 36; 48x96 tile grid unpadded to 6 rows x 10 columns = 60
        # (its own group), one image_newline per row (6 visual tokens in no group)
        return F.InputSpec(text_tokens=n - 102, visual_groups=(36, 60), marker_tokens=6)
    if family in ("qwen2_vl", "qwen2_5_vl"):  # 4 frames = 2 temporal slices of 6x8 = 48 tokens
        return F.video_input(model.config, 4, tokens_per_frame=48, text_tokens=n - 96)
    # llava_next_video / llava_onevision: 4 frames, 8x8 patches pooled to 4x4 = 16 (OV: + 1 newline)
    spec = F.video_input(model.config, 4)
    return F.video_input(model.config, 4, text_tokens=n - spec.visual_tokens)


@pytest.mark.parametrize(
    "family, attn",
    [("llava", "sdpa"), ("llava_next", "sdpa"), ("llava_next_video", "sdpa"), ("llava_onevision", "sdpa"),
     ("qwen2_vl", "sdpa"), ("qwen2_5_vl", "sdpa"), ("llava_onevision", "eager")],
)
def test_analytic_matches_counted_flops(family, attn):
    model = build_tiny_model(family, attn, num_layers=NUM_LAYERS, seed=0)
    kind = "image" if family in ("llava", "llava_next") else "video"
    inputs = make_inputs(model, kind=kind, num_frames=4, text_lengths=(10,))
    described = _described(family, model, inputs)
    assert described.total_tokens == inputs["input_ids"].shape[1]

    base_counted = counted_decoder_flops(model, inputs)
    base = F.estimate(model.config, described, None, dtype="float32")
    assert rel(base.prefill_flops, base_counted) < 0.02

    apply_aim(model, AIM_CFG)
    try:
        aim_counted = counted_decoder_flops(model, inputs)
        stats = last_stats(model)
    finally:
        remove_aim(model)
    aim = F.estimate(model.config, described, AIM_CFG, dtype="float32")
    assert rel(aim.prefill_flops, aim_counted) < 0.02
    assert aim_counted < 0.6 * base_counted  # the engine really computes less
    # same rounding as the engine: tokens per layer and cache entries agree exactly
    assert stats.visual_tokens_before_merge == [described.visual_tokens]
    assert stats.visual_tokens_after_merge == [aim.visual_tokens_in_llm]
    assert [row[0] for row in stats.tokens_per_layer] == aim.tokens_per_layer
    assert stats.kv_cache_entries_per_layer == aim.tokens_per_layer
    assert F.prefill_flops(model.config, [row[0] for row in stats.tokens_per_layer]) == aim.prefill_flops
    kv_bytes = sum(entries * base.layers[0].kv_cache_bytes // base.layers[0].tokens
                   for entries in stats.kv_cache_entries_per_layer)
    assert kv_bytes == aim.kv_cache_bytes


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_analytic_temporal_merging_matches_the_engine(family):
    config = AIMConfig(temporal_keep=0.5, temporal_window=2, merge_keep=0.5, prune_start=1, prune_step=0.25)
    model = build_tiny_model(family, num_layers=NUM_LAYERS, seed=0)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(10,))
    described = _described(family, model, inputs)
    apply_aim(model, config)
    try:
        counted = counted_decoder_flops(model, inputs)
        stats = last_stats(model)
    finally:
        remove_aim(model)
    aim = F.estimate(model.config, described, config, dtype="float32")
    assert stats.visual_tokens_after_merge == [aim.visual_tokens_in_llm]
    assert aim.visual_tokens_in_llm < F.estimate(model.config, described, config.replace(temporal_keep=1.0)).visual_tokens_in_llm
    assert [row[0] for row in stats.tokens_per_layer] == aim.tokens_per_layer
    assert rel(aim.prefill_flops, counted) < 0.02
    with pytest.raises(ValueError, match="depend on the pixels"):
        F.estimate(model.config, described, AIMConfig(temporal_threshold=0.9))


def test_mask_mode_saves_nothing_and_the_model_says_so():
    model = build_tiny_model("llava_onevision", "sdpa", num_layers=NUM_LAYERS)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(10,))
    described = _described("llava_onevision", model, inputs)
    config = AIM_CFG.replace(prune_mode="mask")
    apply_aim(model, config)
    try:
        counted = counted_decoder_flops(model, inputs)
    finally:
        remove_aim(model)
    report = F.estimate(model.config, described, config)
    assert rel(report.prefill_flops, counted) < 0.02
    assert report.prefill_flops == F.estimate(model.config, described).prefill_flops
    assert report.notes


def test_vision_estimate_matches_counted_tower():
    model = build_tiny_model("llava_onevision", "sdpa", num_layers=2)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(10,))
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_MAP)
    with torch.no_grad(), counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    tower = sum(sum(ops.values()) for name, ops in counts.items()
                if re.search(r"\.model\.(vision_tower|multi_modal_projector)$", name))
    assert rel(F.vision_flops(model.config, F.video_input(model.config, 4)), tower) < 0.02


# --- bad inputs ------------------------------------------------------------------------------


def test_unknown_model_lists_builtins():
    with pytest.raises(ValueError, match="llava-onevision-qwen2-7b") as info:
        F.load_model("no-such-model")
    for name in F.builtin_models():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: F.video_input(OV, -1), "frames"),
        (lambda: F.video_input(OV, 0), "frames"),
        (lambda: F.video_input(OV, 4, tokens_per_frame=0), "tokens_per_frame"),
        (lambda: F.video_input(OV, 4, text_tokens=-5), "text_tokens"),
        (lambda: F.video_input("llava-1.5-7b", 4), "images, not video"),
        (lambda: F.video_input("qwen2-vl-7b", 4), "tokens_per_frame"),
        (lambda: F.image_input(OV, 0), "images"),
        (lambda: F.estimate(OV, F.video_input(OV, 4), dtype="int3"), "dtype"),
        (lambda: F.estimate(OV, "32 frames"), "InputSpec"),
        (lambda: F.estimate(OV, F.video_input(OV, 4), attention="flash"), "attention"),
        (lambda: F.estimate(OV, F.video_input(OV, 4), AIMConfig(prune_start=40)), "prune_start"),
        (lambda: F.load_model({"model_type": "custom", "hidden_size": 8}), "lacks LLM field"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_paper_report(capsys):
    assert flops_main(["--model", OV, "--frames", "32", "--tokens-per-frame", "196", "--text-tokens", "100"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"baseline ([\d.]+)\s+AIM ([\d.]+)\s+ratio ([\d.]+)x", out)
    assert match, out
    assert rel(float(match.group(1)), 99.63) < 0.01 and rel(float(match.group(2)), 14.76) < 0.01
    assert "total" in out and "KV cache" in out and "Vision tower" in out
    assert len(re.findall(r"^\s+\d+ \|", out, flags=re.M)) == 28  # one row per layer


def test_cli_json_and_options(capsys):
    assert flops_main(["--frames", "8", "--no-prune", "--merge-keep", "0.5", "--dtype", "float32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["aim"]["aim"]["merge_schedule"] == [0.5] and data["aim"]["aim"]["prune"] is False
    assert data["aim"]["visual_tokens_in_llm"] == 8 * 98 + 1
    assert data["baseline"]["dtype"] == "float32"
    assert data["prefill_ratio"] == pytest.approx(data["baseline"]["prefill_flops"] / data["aim"]["prefill_flops"])


def test_cli_sweep_marks_a_frontier(capsys):
    assert flops_main(["--frames", "8", "--sweep"]) == 0
    out = capsys.readouterr().out
    assert "Sweep" in out and 2 <= out.count("| *") < 30  # some settings are dominated


def test_sweep_frontier_is_exactly_the_undominated_points():
    inputs = F.video_input("llava-onevision-qwen2-7b", 8)
    points = F.sweep("llava-onevision-qwen2-7b", inputs)

    def dominated(p):
        return any(q.prefill_flops <= p.prefill_flops and q.kv_cache_bytes >= p.kv_cache_bytes
                   and (q.prefill_flops, q.kv_cache_bytes) != (p.prefill_flops, p.kv_cache_bytes) for q in points)

    assert [p.frontier for p in points] == [not dominated(p) for p in points]
    assert 2 <= sum(p.frontier for p in points) < len(points)


def test_cli_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    target = tmp_path / "flops.png"
    assert flops_main(["--frames", "8", "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nope"], "Built-in models"),
        (["--frames", "-2"], "frames"),
        (["--model", "llava-1.5-7b", "--frames", "4"], "images"),
        (["--no-merge", "--merge-keep", "0.5"], "contradict"),
    ],
)
def test_cli_bad_input_is_an_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        flops_main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_aim_console_entry_has_flops(capsys):
    from aim.cli import main

    assert main(["flops", "--frames", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prefill_ratio"] > 1


# --- the prefill benchmark (smoke) -------------------------------------------------------------


def test_prefill_benchmark_quick_run():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefill.py"
    spec = importlib.util.spec_from_file_location("aim_bench_prefill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run("quick", repeats=1, warmup=0, device="cpu")
    rows = result["rows"]
    assert list(rows) == ["baseline", "merge-only", "merge+prune", "temporal+merge", "frames 0.5+merge"]
    for row in rows.values():
        assert row["kv_cache_bytes"] == row["analytic_kv_cache_bytes"]  # read from the real cache
        assert row["total_s"] > 0 and row["llm_s"] <= row["total_s"]
    assert rows["baseline"]["analytic_ratio"] == 1.0
    assert 1.0 < rows["merge-only"]["analytic_ratio"] < rows["merge+prune"]["analytic_ratio"]
    assert rows["temporal+merge"]["analytic_ratio"] > rows["merge-only"]["analytic_ratio"]  # fewer tokens than merging alone
    frames = rows["frames 0.5+merge"]  # half the frames through the tower: the vision estimate halves too
    assert frames["analytic_ratio"] > rows["merge-only"]["analytic_ratio"]
    assert frames["analytic_vision_flops"] < 0.6 * rows["merge-only"]["analytic_vision_flops"]
    assert frames["kv_cache_bytes"] < rows["merge-only"]["kv_cache_bytes"]
    assert "Goal (merge+prune)" in bench.format_result(result)


def test_prefill_flops_from_token_counts_checks_the_depth():
    with pytest.raises(ValueError, match="28 decoder layers"):
        F.prefill_flops("llava-onevision-qwen2-7b", [100] * 27)


def test_flops_counting_needs_no_torch():
    """`aim flops` and `aim.flops` read configs only: no torch (nor transformers) import."""
    import subprocess
    import sys

    code = (
        "import sys; from aim import flops as F, AIMConfig; "
        "c = F.compare('llava-onevision-qwen2-7b', F.video_input('llava-onevision-qwen2-7b', 32), AIMConfig()); "
        "assert c.baseline.prefill_flops > c.aim.prefill_flops; "
        "specs = [F.load_model(m) for m in F.builtin_models()]; assert all(s.vision is not None for s in specs); "
        "import aim.cli; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
