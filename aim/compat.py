"""Everything that differs between the transformers releases aim supports, in one place.

transformers 5.24 renamed the cache argument of the model and decoder-layer forwards from
``past_key_values`` to ``cache`` (and the output field with it; the old names are deprecated,
removal announced for 5.40). A patched forward that passes the old name while transformers
passes the new one decodes *without its cache*, silently: so aim never hard-codes either name.
It reads the name each forward declares (`cache_argument`), accepts whichever one a caller
used (`given_cache`) and fills whichever field the output class has (`model_output`).

`TESTED_TRANSFORMERS` is the range the test suite ran on (CI runs it on both ends);
`warn_if_untested` warns once when the installed release is outside it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from typing import Any, Callable

import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast

logger = logging.getLogger(__name__)

# The lowest and the newest transformers release the whole test suite ran on (.ci/run runs both).
TESTED_TRANSFORMERS: tuple[str, str] = ("5.21.0", "5.25.0")
CACHE_NAMES = ("cache", "past_key_values")  # new name first
_warned: set[str] = set()


def _release(version: str) -> tuple[int, ...]:
    """``"5.24.1"`` -> ``(5, 24, 1, 0)``; a pre-release sorts before its release (``"5.21.0rc1"`` ->
    ``(5, 21, 0, -1)``), a ``.devN`` part is dropped."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d*", piece).group()
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:  # "0rc1": a pre-release, before the release itself
            parts.append(-1)
            break
    return tuple(parts + [0] * (4 - len(parts)))


def is_tested(version: str) -> bool:
    """Whether transformers `version` lies in `TESTED_TRANSFORMERS` (patch releases of the newest
    tested minor count as tested)."""
    low, high = (_release(v) for v in TESTED_TRANSFORMERS)
    release = _release(version)
    return low <= release and release[:2] <= high[:2]


def installed_version() -> str:
    return transformers.__version__


def warn_if_untested(version: str | None = None) -> bool:
    """Log one warning per process when transformers is outside the tested range; True if it is."""
    version = version or installed_version()
    if is_tested(version):
        return False
    if version not in _warned:
        _warned.add(version)
        logger.warning(
            "aim was tested with transformers %s to %s; this is transformers %s. If results look wrong, "
            "install a tested release: pip install 'transformers>=%s,<=%s'",
            *TESTED_TRANSFORMERS, version, TESTED_TRANSFORMERS[0], TESTED_TRANSFORMERS[1],
        )
    return True


def cache_argument(forward: Callable) -> str:
    """The name under which `forward` (a model or decoder-layer forward) takes the KV cache."""
    parameters = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise TypeError(
        f"{getattr(forward, '__qualname__', forward)} takes none of the cache arguments {CACHE_NAMES}; "
        f"this transformers release ({transformers.__version__}) is not supported by aim"
    )


def given_cache(kwargs: dict[str, Any]) -> Any:
    """Pop the cache from `kwargs` under whichever supported name the caller used (None if absent)."""
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError(f"got the KV cache under two names, {' and '.join(given)}; pass it once")
    values = [kwargs.pop(name, None) for name in CACHE_NAMES]
    return next((value for value in values if value is not None), None)


_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(BaseModelOutputWithPast)}
OUTPUT_CACHE_FIELD = next(name for name in CACHE_NAMES if name in _OUTPUT_FIELDS)


def model_output(last_hidden_state, cache) -> BaseModelOutputWithPast:
    """A decoder's output with its cache in the field this transformers release declares."""
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, **{OUTPUT_CACHE_FIELD: cache})


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    return getattr(output, OUTPUT_CACHE_FIELD, None)
