"""``@handler(ConfigType)``: the one dispatch from a config type to the function that applies it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from gptedge.runtime.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])
_HANDLERS: dict[type, Callable[..., Any]] = {}


def handler(config_type: type) -> Callable[[F], F]:
    """Register ``fn(job, config)`` as the handler of ``config_type``."""
    def register(fn: F) -> F:
        assert config_type not in _HANDLERS, f"two handlers for {config_type.__name__}"
        _HANDLERS[config_type] = fn
        return fn
    return register


def handler_for(config: object) -> Callable[..., Any]:
    """The registered handler of ``type(config)`` (imports the mode modules on first use)."""
    from gptedge.quantize import fp16, int4, int8, int8_dynamic, mixed, prune  # noqa: F401  (they register)
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise InputError(f"{type(config).__name__} is not a quantization config; use Fp16Config, "
                         "Int8DynamicConfig, Int8Config, Int4Config, MixedConfig or PruneConfig") from None
