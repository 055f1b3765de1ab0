"""``merged_positions="contiguous"``: the positions a serving engine gives merged tokens.

Reference: the unpatched model run on the prompt a serving engine builds (vLLM with aim's plugin):
as many placeholders as merging keeps, the merged features (`aim.merge.merge_item`, or for an
any-resolution image `aim.merge.merge_item_groups` over its base view and grid) in their place, and the model's own positions for that prompt (Qwen: its rope index for a grid of
``(frames, 1, kept per frame)`` tokens, `aim.positions.mrope_row_layout`).
"""

import pytest
import torch

from aim import AIMConfig, apply_aim, is_applied, remove_aim
from aim.counts import merged_anyres_tokens, merged_item_tokens
from aim.layout import groups_without_markers
from aim.merge import merge_frames, merge_item, merge_item_groups
from aim.positions import contiguous_positions, destination_mrope, mrope_row_layout
from aim.tiny import build_tiny_model, make_inputs

CASES = [("llava_onevision", "video"), ("llava_onevision", "image"), ("qwen2_vl", "image"), ("qwen2_vl", "video"), ("qwen2_5_vl", "video")]
MERGE_ONLY = dict(merge_keep=0.5, prune=False, merged_positions="contiguous")
SPECIAL_IDS = list(range(8))

_models: dict = {}


def tiny(family):
    if family not in _models:
        _models[family] = build_tiny_model(family, num_layers=3, seed=1)
    model = _models[family]
    if is_applied(model):
        remove_aim(model)
    return model


def test_contiguous_1d_counts_on_from_the_first_token():
    positions = torch.arange(3, 11).expand(2, 8)
    stays = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    valid = torch.ones_like(stays)
    valid[1, :2] = False  # left padding
    new, shift = contiguous_positions(positions, stays, valid, torch.zeros_like(stays), [[], []])
    assert new[0][stays[0]].tolist() == [3, 4, 5, 6, 7]
    assert new[1][stays[1]].tolist() == [5, 6, 7, 8, 9, 10]
    assert shift.tolist() == [-3, 0]
    # a prompt whose first token merged away still starts at its first position
    stays = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    new, shift = contiguous_positions(positions[:1], stays, torch.ones_like(stays), torch.zeros_like(stays), [[]])
    assert new[0][stays[0]].tolist() == [3, 4, 5, 6, 7, 8] and shift.tolist() == [-2]


def test_contiguous_mrope_lays_each_frame_out_as_a_row():
    # text 0..1, then a video of 2 frames of a 2x2 grid at t offsets 0 and 3 (Qwen2.5-VL's scaled
    # time), then text from max + 1 = 2 + 3 + 1 = 6
    t = [0, 1] + [2] * 4 + [5] * 4 + [6, 7]
    h = [0, 1] + [2, 2, 3, 3] * 2 + [6, 7]
    w = [0, 1] + [2, 3, 2, 3] * 2 + [6, 7]
    old = torch.tensor([t, h, w]).unsqueeze(1)
    visual = torch.tensor([[False] * 2 + [True] * 8 + [False] * 2])
    stays = torch.ones_like(visual)
    stays[0, [3, 4, 8, 9]] = False  # each frame keeps 2 of its 4 tokens
    groups = [[torch.arange(2, 6), torch.arange(6, 10)]]
    new, shift = contiguous_positions(old, stays, torch.ones_like(stays), visual, groups)
    kept = stays[0]
    assert new[0, 0][kept].tolist() == [0, 1, 2, 2, 5, 5, 6, 7]  # frames keep their time offset
    assert new[1, 0][kept].tolist() == [0, 1, 2, 2, 2, 2, 6, 7]  # one row
    assert new[2, 0][kept].tolist() == [0, 1, 2, 3, 2, 3, 6, 7]  # columns 0, 1 of the kept
    assert shift.tolist() == [0]  # the time axis is the longest here: text goes on at 6
    assert mrope_row_layout([2, 2]) == (2, 1, 2)


def test_contiguous_mrope_when_time_is_the_longest_axis_and_over_two_items():
    # transformers 5.24 numbering: text 0 1, a video of 3 slices at t offsets 0 / 5 / 10 on a 2x2
    # grid from 2 (text resumes after the spatial extent: 2 + 2 = 4), text 4, an image on a 2x2
    # grid from 5, text from 7. Each slice / the image keeps 2 of its 4 tokens.
    t = [0, 1] + [2] * 4 + [7] * 4 + [12] * 4 + [4] + [5] * 4 + [7, 8]
    h = [0, 1] + [2, 2, 3, 3] * 3 + [4] + [5, 5, 6, 6] + [7, 8]
    w = [0, 1] + [2, 3, 2, 3] * 3 + [4] + [5, 6, 5, 6] + [7, 8]
    old = torch.tensor([t, h, w]).unsqueeze(1)
    visual = torch.zeros(1, len(t), dtype=torch.bool)
    visual[0, 2:14] = visual[0, 15:19] = True
    groups = [[torch.arange(2, 6), torch.arange(6, 10), torch.arange(10, 14), torch.arange(15, 19)]]
    stays = torch.ones_like(visual)
    stays[0, [3, 5, 7, 9, 11, 13, 16, 18]] = False
    new, shift = contiguous_positions(old, stays, torch.ones_like(stays), visual, groups)
    kept = new[:, 0][:, stays[0]].tolist()
    # the video: time offsets kept, one row per slice; text goes on after the largest position (12)
    # as vLLM numbers it; the image starts after that text and the shift carries on
    assert kept[0] == [0, 1, 2, 2, 7, 7, 12, 12, 13, 14, 14, 16, 17]
    assert kept[1] == [0, 1, 2, 2, 2, 2, 2, 2, 13, 14, 14, 16, 17]
    assert kept[2] == [0, 1, 2, 3, 2, 3, 2, 3, 13, 14, 15, 16, 17]
    assert shift.tolist() == [9]
    with pytest.raises(ValueError, match="equal kept tokens per frame"):
        mrope_row_layout([2, 3])


def _item_features(model, inputs, kind):
    """Per image / video: the encoder's features and its frame count (temporal slices)."""
    inner = model.model
    if kind == "video" and "video_grid_thw" not in inputs:  # LLaVA-OneVision
        out = inner.get_video_features(inputs["pixel_values_videos"])
        features = getattr(out, "pooler_output", out)
        return [(f.reshape(-1, f.shape[-1]), inputs["pixel_values_videos"].shape[1], 1) for f in features]
    pixels, grid = (("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw"))
    getter = inner.get_image_features if kind == "image" else inner.get_video_features
    out = getter(inputs[pixels], inputs[grid])
    features = getattr(out, "pooler_output", out)
    return [(f, int(g[0]), 0) for f, g in zip(features, inputs[grid])]


def _anyres_image_merged(model, inputs, schedule):
    """A LLaVA-OneVision image as vLLM's plugin merges it: base view and grid as two groups, the
    newline closing each grid row kept."""
    out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                         batch_num_images=inputs.get("batch_num_images"))
    features = getattr(out, "pooler_output", out)
    features = features[0] if isinstance(features, (list, tuple)) else features
    base = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    groups = groups_without_markers(features, model.model.image_newline, base_tokens=base)
    merged = merge_item_groups(features, groups, schedule)
    grid = groups[1].numel()
    newlines = features.shape[0] - base - grid
    assert newlines > 1 and merged.shape[0] == merged_anyres_tokens(base, grid, newlines, schedule)
    return merged


def serving_prompt(model, inputs, kind, schedule):
    """inputs_embeds / position_ids / attention_mask of the merged prompt (one sample)."""
    ids = inputs["input_ids"][0]
    placeholder = model.config.image_token_id if kind == "image" else model.config.video_token_id
    if kind == "image" and "image_sizes" in inputs:
        merged, frames = _anyres_image_merged(model, inputs, schedule), 1
    else:
        (features, frames, markers), = _item_features(model, inputs, kind)
        merged = merge_item(features, frames, schedule, markers)
        per_frame = (features.shape[0] - markers) // frames
        assert merged.shape[0] == merged_item_tokens(per_frame, frames, schedule, markers)
    where = (ids == placeholder).nonzero().flatten()
    short = torch.cat([ids[: where[0]], torch.full((merged.shape[0],), placeholder), ids[where[-1] + 1:]])[None]
    embeds = model.get_input_embeddings()(short)
    embeds[short == placeholder] = merged.to(embeds.dtype)
    prompt = {"inputs_embeds": embeds, "attention_mask": torch.ones_like(short)}
    if "mm_token_type_ids" in inputs:
        types = (short == placeholder).long() * (1 if kind == "image" else 2)
        merge = model.config.vision_config.spatial_merge_size
        t, h, w = mrope_row_layout([merged.shape[0] // frames] * frames)
        grid = torch.tensor([[t, h * merge, w * merge]])
        grids = {"image_grid_thw": grid} if kind == "image" else {"video_grid_thw": grid}
        prompt["position_ids"] = model.model.get_rope_index(short, types, **grids)[0]
    return prompt, short.shape[1]


@pytest.mark.parametrize("family, kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_contiguous_merging_equals_the_unpatched_model_on_the_merged_prompt(family, kind):
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(9,))
    config = AIMConfig(**MERGE_ONLY)
    with torch.no_grad():
        prompt, short_length = serving_prompt(model, inputs, kind, config.merge_schedule)
        reference = model(**prompt).logits
        apply_aim(model, config)
        patched = model(**inputs).logits
        destination = model(**inputs, aim_config=config.replace(merged_positions="destination")).logits
    assert short_length < inputs["input_ids"].shape[1]
    tail = 5  # the text after the visual tokens (and the vision end marker)
    torch.testing.assert_close(patched[0, -tail:], reference[0, -tail:], rtol=1e-4, atol=1e-4)
    # the rule matters: the default rule keeps the input positions and gives other logits
    assert not torch.allclose(destination[0, -tail:], reference[0, -tail:], rtol=1e-4, atol=1e-4)


def test_contiguous_merging_of_a_large_anyres_image_whose_grid_is_shrunk():
    """A LLaVA-OneVision image so large that its grid is shrunk (``anyres_max_9``: 4 x 4 crops are
    interpolated down to ~9 crops' worth of rows and columns) still merges as the serving engine
    merges it: base view and grid as two groups, the newlines of the shrunk rows kept."""
    model = tiny("llava_onevision")
    size = model.config.vision_config.image_size
    pinpoints = model.config.image_grid_pinpoints
    model.config.image_grid_pinpoints = [[4 * size, 4 * size]]
    try:
        inputs = make_inputs(model, kind="image", batch_size=1, text_lengths=(9,), image_sizes=[(4 * size, 4 * size)])
        config = AIMConfig(**MERGE_ONLY)
        with torch.no_grad():
            prompt, short_length = serving_prompt(model, inputs, "image", config.merge_schedule)
            reference = model(**prompt).logits
            apply_aim(model, config)
            patched = model(**inputs).logits
        patches = size // model.config.vision_config.patch_size
        # shrunk: fewer grid rows than the 4 crops' 4 * patches
        visual = int((inputs["input_ids"] == model.config.image_token_index).sum())
        assert visual < patches**2 + (4 * patches) ** 2 + 4 * patches
        assert short_length < inputs["input_ids"].shape[1]
        torch.testing.assert_close(patched[0, -5:], reference[0, -5:], rtol=1e-4, atol=1e-4)
    finally:
        model.config.image_grid_pinpoints = pinpoints
        if is_applied(model):
            remove_aim(model)


@pytest.mark.parametrize("family, kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_contiguous_generate_with_cache_equals_recomputation(family, kind):
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=2, text_lengths=(5, 9))
    apply_aim(model, AIMConfig(merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25), merged_positions="contiguous"))
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=SPECIAL_IDS)
    greedy.update(return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **greedy)
        recomputed = model.generate(**inputs, **greedy, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    # every decoding step at the right (shifted) positions: the logits, not only the argmax
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_recomputed, rtol=1e-4, atol=1e-4)


def place_after_encoding(positions, ids, vision_start, item_rows):
    """What vLLM's pruning interface does with the rows `destination_mrope` returns (one item):
    the item's tokens at base + [t, h, w] from just after its vision start token, the text after it
    from base + resume on (vllm/multimodal/video_prune/evs.py, 4-channel case)."""
    positions = positions.clone()
    start = int((ids == vision_start).nonzero()[0])
    base = positions[-1, start] + 1
    end = start + 1 + item_rows.shape[0]
    positions[:, start + 1:end] = item_rows[:, :3].T + base
    positions[:, end:] = torch.arange(1, positions.shape[1] - end + 1) + base + item_rows[0, 3] - 1
    return positions


QWEN_CASES = [c for c in CASES if c[0].startswith("qwen")]


@pytest.mark.parametrize("family, kind", QWEN_CASES, ids=[f"{f}-{k}" for f, k in QWEN_CASES])
def test_destination_positions_placed_after_encoding_equal_the_transformers_path(family, kind):
    """A serving engine that renumbers the merged prompt after encoding (vLLM's pruning interface,
    used by the plugin's ``aim_merged_positions="destination"``) with `destination_mrope`'s rows
    gives the logits of aim's transformers path under its default rule."""
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(9,))
    config = AIMConfig(merge_keep=0.5, prune=False)
    ids = inputs["input_ids"][0]
    placeholder = model.config.image_token_id if kind == "image" else model.config.video_token_id
    grid_key = "image_grid_thw" if kind == "image" else "video_grid_thw"
    merge = model.config.vision_config.spatial_merge_size
    frames, height, width = (int(x) for x in inputs[grid_key][0])
    seconds = inputs.get("second_per_grid_ts")  # 1 s per temporal slice when not given, as transformers and vLLM take it
    time_scale = (1.0 if seconds is None else float(seconds[0])) * getattr(model.config.vision_config, "tokens_per_second", 1)
    with torch.no_grad():
        (features, slices, _), = _item_features(model, inputs, kind)
        merged = merge_frames(features, slices, config.merge_schedule)
        rows = destination_mrope((slices, height // merge, width // merge), merged.index, time_scale)
        where = (ids == placeholder).nonzero().flatten()
        kept = merged.features.reshape(-1, features.shape[-1])
        short = torch.cat([ids[: where[0]], torch.full((kept.shape[0],), placeholder), ids[where[-1] + 1:]])[None]
        embeds = model.get_input_embeddings()(short)
        embeds[short == placeholder] = kept.to(embeds.dtype)
        contiguous_start = torch.arange(short.shape[1]).expand(3, -1)  # overwritten from the item on
        positions = place_after_encoding(contiguous_start, short[0], model.config.vision_start_token_id, rows)
        reference = model(inputs_embeds=embeds, position_ids=positions[:, None], attention_mask=torch.ones_like(short)).logits
        apply_aim(model, config)
        patched = model(**inputs).logits
        contiguous = model(**inputs, aim_config=config.replace(merged_positions="contiguous")).logits
    tail = 5
    torch.testing.assert_close(patched[0, -tail:], reference[0, -tail:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(contiguous[0, -tail:], reference[0, -tail:], rtol=1e-4, atol=1e-4)


def test_destination_rows_keep_each_survivors_place_and_time():
    # 3 slices of a 2 x 3 grid, 2 s per slice at 2 tokens per second: times 0, 4, 8
    index = torch.tensor([[0, 4], [1, 5], [2, 3]])
    rows = destination_mrope((3, 2, 3), index, time_scale=4.0)
    assert rows[:, 0].tolist() == [0, 0, 4, 4, 8, 8]
    assert rows[:, 1].tolist() == [0, 1, 0, 1, 0, 1]
    assert rows[:, 2].tolist() == [0, 1, 1, 2, 2, 0]
    # the largest position (time 8) + 1, as vLLM numbers it (transformers 5.24: after max(h, w) = 3)
    assert set(rows[:, 3].tolist()) == {9}
    assert set(destination_mrope((1, 4, 6), torch.tensor([[0, 23]]))[:, 3].tolist()) == {6}  # width 6
    assert destination_mrope((2, 2, 2), torch.tensor([[0], [1]]), time_scale=0.75)[:, 0].tolist() == [0, 0]  # truncated
    with pytest.raises(ValueError, match="survivor index outside"):
        destination_mrope((1, 2, 2), torch.tensor([[4]]))
    with pytest.raises(ValueError, match="index per frame"):
        destination_mrope((2, 2, 2), torch.tensor([[0, 1]]))


def test_unknown_position_rule_is_refused():
    with pytest.raises(ValueError, match="merged_positions must be one of"):
        AIMConfig(merged_positions="gaps")
