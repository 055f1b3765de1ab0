"""The study: synthetic QA generator, batching into model inputs, and the shipped trained model."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch

from aim import apply_aim, last_stats, remove_aim
from aim.study import data
from aim.study.evaluate import chance_levels, evaluate
from aim.study.model import (
    DEFAULT_MODEL_DIR, build_model, build_tokenizer, load_default_model, model_inputs, to_inputs, visual_token_count,
)

# ------------------------------------------------------------------------------------------
# Reading objects back from the pixels (independent of the generator's internals)
# ------------------------------------------------------------------------------------------


def colour_masks(frame: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels of each saturated colour in an (H, W, 3) uint8 frame, classified by hue."""
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    saturated = frame.max(-1).astype(int) - frame.min(-1) > 90
    masks = {
        "red": saturated & (r > 150) & (g < 110) & (b < 110),
        "yellow": saturated & (r > 150) & (g > 150) & (b < 110),
        "green": saturated & (g > 120) & (r < 110) & (b < 110),
        "blue": saturated & (b > 150) & (r < 110) & (g < 140),
    }
    return {name: mask for name, mask in masks.items() if mask.sum() > 20}


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def fill_ratio(mask: np.ndarray) -> float:
    """Area over bounding-box area: ~1 square, ~0.79 circle, ~0.5 triangle."""
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def examples_of(kind: str, n: int, split: str = "test", recipe: str | None = None) -> list[data.Example]:
    return data.dataset(split, n, kinds=(kind,), recipe=recipe)


# ------------------------------------------------------------------------------------------
# Generator
# ------------------------------------------------------------------------------------------


def test_generator_is_deterministic_by_seed():
    a, b = data.dataset("train", 16), data.dataset("train", 16)
    for x, y in zip(a, b):
        assert np.array_equal(x.pixels, y.pixels) and x.qa == y.qa
    # example i does not depend on where the stream starts
    assert np.array_equal(data.dataset("train", 4, start=12)[0].pixels, a[12].pixels)
    assert not np.array_equal(data.make_example(1, "count").pixels, data.make_example(2, "count").pixels)
    assert {e.kind for e in a} == set(data.KINDS)  # balanced over the kinds
    assert a[0].pixels.shape == (data.NUM_FRAMES, data.FRAME_SIZE, data.FRAME_SIZE, 3) and a[0].pixels.dtype == np.uint8
    image = next(e for e in a if not e.is_video)
    assert image.pixels.shape == (data.FRAME_SIZE, data.FRAME_SIZE, 3)


def test_splits_are_disjoint():
    seeds = {s: {data.split_seed(s, 0), data.split_seed(s, data.SPLIT_SIZE - 1)} for s in data.SPLIT_OFFSETS}
    ranges = sorted((min(v), max(v)) for v in seeds.values())
    assert all(hi < next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        data.split_seed("test", data.SPLIT_SIZE)
    # held out: no test example is also a training example (same kinds, same positions in the split)
    train = {e.pixels.tobytes() for e in data.dataset("train", 48)}
    assert not any(e.pixels.tobytes() in train for e in data.dataset("test", 48))


@pytest.mark.parametrize("recipe", tuple(data.RECIPES))
def test_moving_object_colour_shape_and_direction_match_the_pixels(recipe):
    for example in examples_of("motion_colour", 24, recipe=recipe):
        answers = {q.kind: q.answer for q in example.qa}
        tracks = [colour_masks(frame) for frame in example.pixels]
        colours = set.intersection(*(set(t) for t in tracks))  # every object is visible throughout
        moves = {c: centroid(tracks[-1][c]) - centroid(tracks[0][c]) for c in colours}
        movers = [c for c, d in moves.items() if np.abs(d).max() > 10]
        assert movers == [answers["motion_colour"]], (example.seed, moves)
        dx, dy = moves[movers[0]]
        direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert direction == answers["motion_direction"]
        ratio = fill_ratio(tracks[0][movers[0]])
        shape = "square" if ratio > 0.9 else "circle" if ratio > 0.65 else "triangle"
        assert shape == answers["motion_shape"], (example.seed, ratio)
        if "still_colour" in answers:  # extra turn of the v2 recipe: the one still shape
            assert answers["still_colour"] in colours and answers["still_colour"] != movers[0]


def test_descriptions_state_the_scenes_answers():
    for kind in data.KINDS:
        for example in examples_of(kind, 6, recipe="v2"):
            a = {q.kind: q.answer for q in example.qa}
            description = data.description_of(example)
            assert description.question == f"describe the {'video' if example.is_video else 'image'} ."
            text, words = description.answer, description.answer.split(" ")
            assert 9 <= len(words) <= 30 and text.endswith(" .")
            if kind.startswith("motion"):
                assert text.startswith(f"a {a['motion_colour']} {a['motion_shape']} moves {a['motion_direction']} ")
                assert ("still_colour" in a) == (f"the {a.get('still_colour')} " in text)
            elif kind == "count":
                target = example.question.split()[2]
                assert text.startswith(f"there are {example.answer} {target} objects")
            elif kind == "event_time":
                assert text.startswith(f"a {a['event_colour']} {a['event_shape']} flashes at the {a['event_time']} ")
            else:
                assert text == f"a {a['image_colour']} {a['image_shape']} is at the {a['image_position']} of the image ."
    with pytest.raises(ValueError, match="no description"):
        data.description_of(data.make_example(0, "motion_colour", recipe="v1"))


@pytest.mark.parametrize("recipe", tuple(data.RECIPES))
def test_count_event_and_image_answers_match_the_pixels(recipe):
    counts = set()
    for example in examples_of("count", 24, recipe=recipe):
        for qa in example.qa:
            if qa.kind != "count":
                continue
            colour = qa.question.split()[2]
            frames_with = sum(colour in colour_masks(frame) for frame in example.pixels)
            assert str(frames_with) == qa.answer  # one object per frame
            counts.add(qa.answer)
    assert counts <= set(data.answers_of("count", recipe))
    for example in examples_of("event_time", 12, recipe=recipe):
        seen = [colour_masks(frame) for frame in example.pixels]
        # the flashing shape: the colour seen in one frame only (a still shape is seen in all)
        (flash,) = [t for t, colours in enumerate(seen) if any(sum(c in s for s in seen) == 1 for c in colours)]
        segment = next(i for i, r in enumerate(data.time_segments(len(seen))) if flash in r)
        assert data.TIMES[segment] == example.answer
        answers = {q.kind: q.answer for q in example.qa}
        if "event_colour" in answers:  # extra turns of the v2 recipe: the flashing shape's colour and shape
            (colour,) = [c for c in seen[flash] if sum(c in s for s in seen) == 1]
            assert answers["event_colour"] == colour
            ratio = fill_ratio(seen[flash][colour])
            assert answers["event_shape"] == ("square" if ratio > 0.9 else "circle" if ratio > 0.65 else "triangle")
    for example in examples_of("image_position", 12, recipe=recipe):
        (mask,) = colour_masks(example.pixels).values()
        x, y = centroid(mask) / data.FRAME_SIZE - 0.5
        position = ("right" if x > 0 else "left") if abs(x) > abs(y) else ("bottom" if y > 0 else "top")
        assert position == example.answer


def test_recipes():
    v1, v2 = data.RECIPES["v1"], data.RECIPES["v2"]
    assert data.recipe_of(None) == data.RECIPES[data.DEFAULT_RECIPE]
    with pytest.raises(ValueError):
        data.recipe_of("v0")
    # the default recipe is what an unnamed call generates
    a, b = data.make_example(7, "motion_shape"), data.make_example(7, "motion_shape", recipe=data.DEFAULT_RECIPE)
    assert np.array_equal(a.pixels, b.pixels) and a.qa == b.qa
    assert v2.half_size[0] > v1.half_size[0] and v2.speed[0] > v1.speed[1]  # bigger shapes, faster motion
    assert chance_levels(("count",), "v2") == {"count": 1 / 3} and chance_levels(("count",), "v1") == {"count": 1 / 4}
    # every question and answer word is in the study tokenizer
    tokenizer = build_tokenizer()
    for example in data.dataset("train", 48, recipe="v2"):
        for qa in example.qa:
            assert tokenizer.unk_token_id not in tokenizer(qa.question, add_special_tokens=False)["input_ids"], qa
            assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(qa.answer.split(" ")), qa


def test_stream_mixes_clip_lengths():
    examples = list(data.stream("train", kinds=("motion_direction", "image_colour"), frames=(8, 16), stop=8))
    assert [len(e.pixels) if e.is_video else 0 for e in examples] == [8, 0, 16, 0, 8, 0, 16, 0]


# ------------------------------------------------------------------------------------------
# Model inputs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return build_model(num_layers=2, hidden_size=32, vision_hidden=32, vision_layers=1)


def test_multi_word_answers_are_one_target_per_word_and_a_closing_end(small_model):
    tokenizer = build_tokenizer()
    examples = [data.make_example(data.split_seed("train", i), kind, recipe="v2") for i, kind in enumerate(data.KINDS)]
    inputs = to_inputs(examples, tokenizer, small_model.config, turns=5, complete=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, example in enumerate(examples):
        keep = inputs["answer_ids"][i] != -100
        positions, targets = inputs["answer_positions"][i][keep], inputs["answer_ids"][i][keep]
        # teacher forcing: each target is the token that follows its position
        assert inputs["input_ids"][i][positions + 1].tolist() == targets.tolist()
        expected = []
        for qa in example.qa[:5]:
            words = tokenizer.convert_tokens_to_ids(qa.answer.split(" "))
            expected += words if len(words) == 1 else [*words, end]
        assert targets.tolist() == expected
    # without ``complete`` the prompt ends where the last answer is due: a description's first word
    # is its one target, predicted at the prompt's last position
    asked = [dataclasses.replace(e, qa=(data.description_of(e),)) for e in examples]
    short = to_inputs(asked, tokenizer, small_model.config)
    assert short["answer_ids"][:, 0].tolist() == tokenizer.convert_tokens_to_ids([e.answer.split(" ")[0] for e in asked])
    assert short["answer_ids"].shape[1] == 1 and (short["answer_positions"][:, 0] == short["input_ids"].shape[1] - 1).all()


def test_inputs_have_the_visual_token_count_the_model_expects(small_model):
    tokenizer = build_tokenizer()
    examples = data.dataset("test", 8, recipe="v1")  # 5 videos, 3 images; one-word answers (v2: test_descriptions_*)
    inputs = to_inputs(examples, tokenizer, small_model.config, turns=3)
    config = small_model.config
    placeholders = [(row == config.video_token_id).sum().item() + (row == config.image_token_id).sum().item()
                    for row in inputs["input_ids"]]
    with torch.no_grad():
        video = small_model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        image = small_model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]).pooler_output
    assert video.shape[1] == visual_token_count(config, is_video=True) == 8 * 36 + 1  # 96 px frames: 12x12 patches, pooled 6x6
    assert [len(f) for f in image] == [visual_token_count(config, is_video=False)] * 3 == [144 + 144 + 12] * 3
    expected = [visual_token_count(config, e.is_video) for e in examples]
    assert placeholders == expected
    # left padding; the answer positions hold "assistant" and the answer ids are the answers' ids
    assert (inputs["attention_mask"][:, -1] == 1).all()
    rows = torch.arange(len(examples))[:, None].expand_as(inputs["answer_positions"])
    keep = inputs["answer_ids"] != -100
    assert (inputs["input_ids"][rows[keep], inputs["answer_positions"][keep]] == tokenizer.convert_tokens_to_ids("assistant")).all()
    assert inputs["answer_ids"][:, 0].tolist() == tokenizer.convert_tokens_to_ids([e.answer for e in examples])
    with torch.no_grad():  # the model accepts the batch (it checks placeholders against features)
        small_model(**model_inputs(inputs), logits_to_keep=1)
    # 16-frame clips (the "more frames" experiments) as well
    clips = data.dataset("test", 2, kinds=("event_time",), frames=16, recipe="v2")
    inputs = to_inputs(clips, tokenizer, config)
    assert (inputs["input_ids"] == config.video_token_id).sum(1).tolist() == [16 * 36 + 1] * 2
    with torch.no_grad():
        small_model(**model_inputs(inputs), logits_to_keep=1)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="the video processor needs torchvision")
def test_inputs_equal_the_real_processor(small_model):
    from aim.study.model import build_processor

    processor = build_processor(small_model)
    for example in data.dataset("test", 6)[4:]:  # a video and an image
        kind = "video" if example.is_video else "image"
        content = [{"type": kind}, {"type": "text", "text": example.question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        real = processor(text=[text], return_tensors="pt", **{f"{kind}s": [example.pixels]})
        mine = to_inputs([example], processor, small_model.config)
        assert torch.equal(real["input_ids"], mine["input_ids"])
        key = "pixel_values_videos" if example.is_video else "pixel_values"
        torch.testing.assert_close(real[key].float(), mine[key], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# The shipped trained model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        pytest.fail(f"the trained default model is missing from {DEFAULT_MODEL_DIR}")
    return load_default_model()


def test_default_model_scores_what_its_training_run_recorded(default_model):
    """The shipped model scores on the 800 test questions what `training.json` recorded when it
    was trained, at least 85% overall (issue 15's goal), and every kind far above its chance level."""
    model, processor = default_model  # loaded with local_files_only: no hub access
    recorded = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())["test"]
    result = evaluate(model, processor, data.dataset("test", recorded["n"]), batch_size=16)
    # another machine's float kernels may flip a near-tie or two; the recorded run is this file's
    assert abs(result["accuracy"] - recorded["accuracy"]) <= 2 / recorded["n"], (result, recorded)
    assert result["accuracy"] >= 0.85, result
    assert all(row["accuracy"] > row["chance"] + 0.25 for row in result["per_kind"].values()), result


def test_evaluate_runs_on_the_model_patched_with_aim(default_model):
    model, processor = default_model
    examples = data.dataset("test", 16)
    apply_aim(model)
    try:
        result = evaluate(model, processor, examples, batch_size=8)
        stats = last_stats(model)
        assert stats.visual_tokens_after_merge[0] < stats.visual_tokens_before_merge[0]
        assert stats.tokens_per_layer[-1][0] < stats.tokens_per_layer[0][0]
    finally:
        remove_aim(model)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 16


def test_training_is_deterministic_by_seed_and_saves_a_loadable_model(tmp_path):
    from aim.study.train import train

    tiny = dict(num_layers=1, hidden_size=32, vision_hidden=32, vision_layers=1)
    runs = [train(tmp_path / name, steps=2, batch_size=2, warmup=1, eval_every=0, test_size=8,
                  threads=torch.get_num_threads(), model_options=tiny, seed=seed)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    models = [load_default_model(tmp_path / name)[0].state_dict() for name in "abc"]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert not all(torch.equal(models[0][k], models[2][k]) for k in models[0])
    assert runs[0]["loss_curve"] == [] and runs[0]["examples_seen"] == 4 and runs[0]["test"]["n"] == 8
    assert (tmp_path / "a" / "training.json").is_file()
    # the v2 recipe, a weighted training mix and mixed clip lengths
    run = train(tmp_path / "d", steps=2, batch_size=3, warmup=1, eval_every=0, test_size=4,
                threads=torch.get_num_threads(), model_options=tiny, recipe="v2", frames=(8, 16),
                kinds=("count", "event_time"), train_kinds=("count", "count", "event_time"))
    assert run["settings"]["recipe"] == "v2" and run["test"]["per_kind"]["count"]["chance"] == 1 / 3
