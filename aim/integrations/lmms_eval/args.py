"""AIM settings in lmms-eval's ``--model_args``: parsed and validated before the model loads.

    --model_args pretrained=...,merge_keep=0.25,prune_start=14,prune_step=0.125
    --model_args pretrained=...,aim=off            # the baseline, through the same code path
    --model_args pretrained=...,aim_budget=0.25    # a budget: aim picks the setting per request

Every `AIMConfig` field is accepted under its own name or with an ``aim_`` prefix
(``merge_keep`` or ``aim_merge_keep``); the prefix is needed only where the base model takes an
argument of the same name. List fields take ``[0.5,0.25]`` (lmms-eval keeps brackets together),
``0.5:0.25`` or ``0.5;0.25``. Plugin options: ``aim`` (on/off), ``aim_output`` (a path to (re)write
the cost summary after each batch of requests, on top of the file next to lmms-eval's results) and
``aim_flops`` (on/off: analytic prefill FLOPs per sample, on by default).

Budgets (`aim.budget`) instead of a fixed setting: ``aim_budget`` (a fraction of the unchanged
model's LLM prefill FLOPs) or ``aim_budget_ms`` (prefill milliseconds, with ``aim_budget_quantile``,
the share of prefills it should hold for), ``aim_profile`` (the calibration profile; default the
``aim_profile.json`` beside the weights) and ``aim_interpolate_keeps`` (on/off). A budget replaces
the AIM settings: giving both is refused, as `apply_aim` refuses it.

This module does not import lmms-eval: the parsing is testable without it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from aim.config import AIMConfig

def _kind(annotation: str) -> str:
    """How a ``--model_args`` string is parsed for an AIMConfig field of this type annotation."""
    for marker, kind in (("tuple", "floats"), ("bool", "bool"), ("float", "float"), ("int", "int"), ("str", "str")):
        if marker in annotation:
            return kind
    raise TypeError(f"no --model_args parser for an AIMConfig field of type {annotation}")  # pragma: no cover


# read from AIMConfig itself, so a new field is an lmms-eval argument without another table
FIELD_KINDS: dict[str, str] = {f.name: _kind(str(f.type)) for f in dataclasses.fields(AIMConfig)}
PLUGIN_OPTIONS = ("aim", "aim_output", "aim_flops")
BUDGET_OPTIONS = ("aim_budget", "aim_budget_ms", "aim_budget_quantile", "aim_profile", "aim_interpolate_keeps")
_TRUE = {"1", "true", "on", "yes", "y"}
_FALSE = {"0", "false", "off", "no", "n", "none"}


class AIMArgumentError(ValueError):
    """A bad AIM entry in ``--model_args`` (unknown key or bad value)."""


@dataclass
class AIMSettings:
    """What the plugin does, from ``--model_args``."""

    config: AIMConfig = field(default_factory=AIMConfig)
    output: str | None = None  # aim_output
    flops: bool = True  # aim_flops
    given: dict = field(default_factory=dict)  # the AIM arguments as given (for the summary)
    budget: Any = None  # an `aim.budget.Budget` (aim_budget / aim_budget_ms / aim_budget_quantile), or None
    profile: str | None = None  # aim_profile; None: the profile beside the weights
    interpolate_keeps: bool = True  # aim_interpolate_keeps

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def as_dict(self) -> dict:
        out = {"enabled": self.enabled, "config": dataclasses.asdict(self.config), "model_args": dict(self.given)}
        if self.budget is not None:
            out["budget"] = {"flops": self.budget.flops, "ms": self.budget.ms, "quantile": self.budget.quantile,
                             "describe": self.budget.describe(), "profile": self.profile,
                             "interpolate_keeps": self.interpolate_keeps}
        return out




def allowed_keys() -> list[str]:
    """Every AIM key accepted in --model_args."""
    return sorted(PLUGIN_OPTIONS[:1] + tuple(FIELD_KINDS) + PLUGIN_OPTIONS[1:] + BUDGET_OPTIONS)


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise AIMArgumentError(f"{key}={value!r}: expected on/off (true/false, 1/0)")


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise AIMArgumentError(f"{key}={value!r}: expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise AIMArgumentError(f"{key}={value!r}: expected an integer") from None


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise AIMArgumentError(f"{key}={value!r}: expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AIMArgumentError(f"{key}={value!r}: expected a number") from None


def _to_floats(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        items: Iterable[Any] = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        text = str(value).strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise AIMArgumentError(f"{key}={value!r}: not a list of numbers") from None
            if not isinstance(items, list):
                raise AIMArgumentError(f"{key}={value!r}: not a list of numbers")
        else:
            for sep in (";", ":", " "):
                if sep in text:
                    items = [t for t in text.split(sep) if t.strip()]
                    break
            else:
                items = [text] if text else []
    return tuple(_to_float(key, item) for item in items)


def convert(name: str, value: Any, key: str | None = None) -> Any:
    """`value` (as lmms-eval parsed it: str, int, float or bool) as the type of AIMConfig.`name`."""
    key = key or name
    kind = FIELD_KINDS[name]
    if kind == "bool":
        return to_bool(key, value)
    if kind == "int":
        return _to_int(key, value)
    if kind == "float":
        return _to_float(key, value)
    if kind == "floats":
        if name == "prune_keep_ratios" and str(value).strip().lower() in ("none", ""):
            return None
        return _to_floats(key, value)
    return str(value)


def parse_model_args(
    kwargs: dict[str, Any], base_params: Iterable[str] | None = None, model: str = "aim model", base: str = "the base model",
) -> tuple[AIMSettings, dict[str, Any]]:
    """Split lmms-eval model arguments into AIM settings and the base model's arguments.

    Args:
        kwargs: the keyword arguments the model class received.
        base_params: the names the base lmms-eval class accepts; a key that is neither an AIM key
            nor one of these is refused here (None: pass unknown keys on to the base class).
        model, base: names for the messages.

    Raises:
        AIMArgumentError: an unknown key, a bad value, or a config `AIMConfig` rejects.
    """
    base_params = set(base_params) if base_params is not None else None
    fields: dict[str, Any] = {}
    settings = AIMSettings()
    rest: dict[str, Any] = {}
    given: dict[str, Any] = {}
    budget: dict[str, Any] = {}
    try:
        switch = _classify(kwargs, base_params, model, base, fields, settings, rest, given, budget)
    except AIMArgumentError as error:
        message = str(error)
        raise AIMArgumentError(message if message.startswith(f"{model}:") else f"{model}: bad AIM argument {message}") from None
    if budget:
        try:
            _budget(budget, fields, switch, settings)
        except AIMArgumentError as error:
            shown = ",".join(f"{k}={v}" for k, v in given.items())
            raise AIMArgumentError(f"{model}: bad AIM arguments ({shown}): {error}") from None
    if switch is False:
        fields["enabled"] = False
    elif switch is True and fields.get("enabled") is False:
        raise AIMArgumentError(f"{model}: aim=on contradicts enabled=False")
    try:
        settings.config = AIMConfig(**fields)
    except (TypeError, ValueError) as error:
        shown = ",".join(f"{k}={v}" for k, v in given.items())
        raise AIMArgumentError(f"{model}: bad AIM arguments ({shown}): {error}") from None
    settings.given = given
    return settings, rest


def _classify(kwargs, base_params, model, base, fields, settings, rest, given, budget) -> bool | None:
    """Sort each key into AIM fields, plugin options or the base model's arguments; returns the aim switch."""
    switch: bool | None = None
    for key, value in kwargs.items():
        name = key[4:] if key.startswith("aim_") and key[4:] in FIELD_KINDS else key
        if key == "aim":
            switch = to_bool(key, value)
        elif key == "aim_output":
            settings.output = None if str(value).strip().lower() in ("", "none") else str(value)
        elif key == "aim_flops":
            settings.flops = to_bool(key, value)
        elif key in BUDGET_OPTIONS:
            budget[key] = value
        elif name in FIELD_KINDS and (name != key or base_params is None or key not in base_params):
            if name in fields:
                raise AIMArgumentError(f"{model}: AIM option {name!r} given twice (as {name} and aim_{name})")
            fields[name] = convert(name, value, key)
        elif key.startswith("aim"):
            raise AIMArgumentError(
                f"{model}: unknown AIM option {key!r}. AIM options: {', '.join(allowed_keys())} "
                f"(each AIMConfig field also as aim_<field>)"
            )
        elif base_params is not None and key not in base_params:
            raise AIMArgumentError(
                f"{model}: unknown model argument {key!r}. AIM options: {', '.join(allowed_keys())}; "
                f"{base} options: {', '.join(sorted(base_params))}"
            )
        else:
            rest[key] = value
            continue
        given[key] = value
    return switch


def _budget(options: dict[str, Any], fields: dict[str, Any], switch: bool | None, settings: AIMSettings) -> None:
    """The budget options into `settings` (`aim.budget.Budget` checks the values)."""
    from aim.budget.select import Budget

    flops, ms, quantile = (None if options.get(key) is None else _to_float(key, options[key])
                           for key in ("aim_budget", "aim_budget_ms", "aim_budget_quantile"))
    if flops is None and ms is None:
        raise AIMArgumentError(f"{' and '.join(options)} appl{'ies' if len(options) == 1 else 'y'} only with a budget: "
                               "add aim_budget=<fraction of the prefill FLOPs> or aim_budget_ms=<milliseconds>")
    if switch is False:
        raise AIMArgumentError("aim=off contradicts a budget (aim_budget / aim_budget_ms)")
    if fields:
        raise AIMArgumentError(f"give either AIM settings ({', '.join(fields)}) or a budget (aim_budget / "
                               "aim_budget_ms: aim picks the setting per request), not both")
    try:
        settings.budget = Budget(flops=flops, ms=ms, quantile=quantile)
    except ValueError as error:
        raise AIMArgumentError(str(error)) from None
    if "aim_profile" in options:
        settings.profile = None if str(options["aim_profile"]).strip().lower() in ("", "none") else str(options["aim_profile"])
    if "aim_interpolate_keeps" in options:
        settings.interpolate_keeps = to_bool("aim_interpolate_keeps", options["aim_interpolate_keeps"])
