"""aim.compat: the tested transformers range, the warning outside it, and the cache-argument names."""

import logging

import pytest
import transformers

from aim import compat


def test_tested_range():
    low, high = compat.TESTED_TRANSFORMERS
    assert compat.is_tested(low) and compat.is_tested(high)
    assert compat.is_tested(high.rsplit(".", 1)[0] + ".7")  # a patch release of the newest tested minor
    assert not compat.is_tested("5.20.2") and not compat.is_tested("4.57.1")
    major, minor = (int(x) for x in high.split(".")[:2])
    assert not compat.is_tested(f"{major}.{minor + 1}.0") and not compat.is_tested(f"{major + 1}.0.0")
    assert compat.is_tested(f"{major}.{minor}.0.dev0")
    assert not compat.is_tested(low + "rc1")  # a release candidate comes before the tested release
    # the suite runs on this transformers: it must lie in the range it claims
    assert compat.is_tested(transformers.__version__), transformers.__version__


def test_setup_lower_bound_is_the_tested_one():
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    low = compat.TESTED_TRANSFORMERS[0].rsplit(".0", 1)[0]
    assert f'"transformers>={low},<6"' in setup


def test_untested_release_warns_once_naming_the_range(caplog, monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="aim.compat"):
        assert compat.warn_if_untested("5.99.0")
        assert compat.warn_if_untested("5.99.0")
        assert not compat.warn_if_untested(compat.TESTED_TRANSFORMERS[1])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    low, high = compat.TESTED_TRANSFORMERS
    assert f"tested with transformers {low} to {high}" in warnings[0].getMessage()
    assert "5.99.0" in warnings[0].getMessage()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_apply_aim_warns_on_an_untested_release(monkeypatch):
    from aim import apply_aim, remove_aim
    from aim.tiny import build_tiny_model

    monkeypatch.setattr(compat, "_warned", set())
    monkeypatch.setattr(compat, "installed_version", lambda: "6.0.0")
    model = build_tiny_model("llava", num_layers=2, seed=0)
    records = _Records()
    compat.logger.addHandler(records)  # the logger's own handler: whatever the global logging setup
    try:
        apply_aim(model)
        remove_aim(model)
    finally:
        compat.logger.removeHandler(records)
    assert len(records.messages) == 1 and "this is transformers 6.0.0" in records.messages[0]


def test_cache_argument_names():
    def new(hidden, cache=None, **kwargs): ...
    def old(hidden, past_key_values=None, **kwargs): ...
    def neither(hidden, **kwargs): ...

    assert compat.cache_argument(new) == "cache"
    assert compat.cache_argument(old) == "past_key_values"
    with pytest.raises(TypeError, match="takes none of the cache arguments"):
        compat.cache_argument(neither)


def test_given_cache_takes_either_name_once():
    cache = object()
    for name in ("cache", "past_key_values"):
        kwargs = {name: cache, "other": 1}
        assert compat.given_cache(kwargs) is cache and kwargs == {"other": 1}
    assert compat.given_cache({}) is None
    with pytest.raises(ValueError, match="under two names"):
        compat.given_cache({"cache": cache, "past_key_values": cache})


def test_model_output_uses_this_release_field():
    cache = object()
    output = compat.model_output("hidden", cache)
    assert compat.output_cache(output) is cache
    assert getattr(output, compat.OUTPUT_CACHE_FIELD) is cache


def test_no_script_folder_shadows_an_installed_module():
    # a script's folder is sys.path[0] when it runs (and pytest puts tests/ there): a file named like a
    # module that transformers imports shadows it. benchmarks/kernels.py hid the hub's `kernels`,
    # which transformers >= 5.25 imports on `import transformers.modeling_utils`, and every benchmark died.
    import importlib.metadata
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    taken |= {"kernels", "triton", "vllm", "lmms_eval", "accelerate", "torchvision"}  # optional, maybe absent here
    for folder in ("benchmarks", "tests", "docs"):
        for path in (root / folder).glob("*"):
            name = path.stem if path.suffix == ".py" else path.name if (path / "__init__.py").exists() else None
            assert name not in taken, f"{path.relative_to(root)} shadows the module {name!r} for scripts run from its folder"
