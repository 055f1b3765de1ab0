"""Families: one file each, keyed by model_type, and the README's "Adding a model" recipe works
for a family written from scratch (a throwaway one, registered from a file outside the package)."""

import importlib.util
import textwrap

import pytest
import torch

from aim import apply_aim, is_applied, last_stats, remove_aim
from aim.cli import main
from aim.families import all_families, family_for_model_type, register, unregister
from aim.patch import supported_models
from aim.tiny import build_tiny_model, make_inputs

# What the README's "Adding a model" section tells a contributor to write, for a made-up family:
# a LLaVA-like model under a new model_type (its config and model classes are subclasses, so the
# test needs nothing from the hub).
RECIPE = '''
import transformers as tf

from aim.families.base import IMAGE_ID, Family
from aim.families.llava import clip_config, still_images


class ToyVLConfig(tf.LlavaConfig):
    model_type = "toy_vl"


class ToyVLModel(tf.LlavaModel):
    config_class = ToyVLConfig


class ToyVLForConditionalGeneration(tf.LlavaForConditionalGeneration):
    config_class = ToyVLConfig


class ToyVLFamily(Family):
    model_type = "toy_vl"
    class_names = ("ToyVLForConditionalGeneration", "ToyVLModel")
    tiny_image_size = 48

    def image_groups(self, model, features, call):
        import torch
        return [[torch.arange(item.shape[0])] for item in features]  # one group per image

    def model_class(self):
        return ToyVLForConditionalGeneration

    def tiny_config(self, text, image_size):
        size = image_size or self.tiny_image_size
        return ToyVLConfig(vision_config=clip_config(size), text_config=tf.LlamaConfig(**text),
                           image_token_index=IMAGE_ID, image_seq_length=(size // 8) ** 2)

    def tiny_visual_inputs(self, model, kind, num_frames, image_sizes, rand, batch):
        return still_images(model, rand, batch)


FAMILIES = (ToyVLFamily(),)
'''


@pytest.fixture
def toy_family(tmp_path):
    path = tmp_path / "toy_vl.py"
    path.write_text(textwrap.dedent(RECIPE))
    spec = importlib.util.spec_from_file_location("toy_vl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    family = register(module.FAMILIES[0])
    family.module = str(path)
    try:
        yield family
    finally:
        unregister("toy_vl")


def test_families_are_keyed_by_model_type_and_cover_the_supported_classes():
    families = list(all_families())
    assert [f.model_type for f in families] == sorted(f.model_type for f in families)
    for family in families:
        assert family_for_model_type(family.model_type) is family
        assert family.module.startswith("aim/families/")
        model_class = family.model_class()
        assert model_class.__name__ == family.class_names[0]
        assert model_class.config_class.model_type == family.model_type
    assert sorted(supported_models()) == sorted(n for f in families for n in f.class_names)


def test_aim_models_lists_each_class_its_family_and_file(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for family in all_families():
        for name in family.class_names:
            line = next(line for line in out.splitlines() if line.startswith(name + " "))
            assert family.model_type in line and family.module in line


def test_a_family_written_from_the_recipe_works_end_to_end(toy_family, capsys):
    model = build_tiny_model("toy_vl", num_layers=4, seed=0)
    inputs = make_inputs(model, kind="image", batch_size=2, text_lengths=(4, 9))
    with torch.no_grad():
        base = model(**inputs).logits
    apply_aim(model, enabled=False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)  # off: bit-identical
    ratios = dict(merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))
    apply_aim(model, prune_mode="mask", **ratios)
    with torch.no_grad():
        masked = model(**inputs).logits
    apply_aim(model, **ratios)
    with torch.no_grad():
        removed = model(**inputs).logits
    stats = last_stats(model)
    torch.testing.assert_close(removed[:, -1], masked[:, -1], rtol=1e-4, atol=1e-4)  # physical == masking
    assert stats.visual_tokens_after_merge[0] < stats.visual_tokens_before_merge[0]  # its groups merged
    assert stats.sequence_length_per_layer[-1] < stats.sequence_length_per_layer[0]
    remove_aim(model)
    assert not is_applied(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
    assert main(["models"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ToyVLForConditionalGeneration"))
    assert line.split()[1:3] == ["toy_vl", "no"] and line.endswith("toy_vl.py")


def test_an_unsupported_class_is_refused_with_the_list():
    model = build_tiny_model("llava", num_layers=2)
    model.config.model_type = "something_else"
    with pytest.raises(TypeError, match="does not support LlavaForConditionalGeneration. Supported transformers classes"):
        apply_aim(model)
