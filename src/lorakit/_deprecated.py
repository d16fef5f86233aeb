"""Modules that were once shadowed by same-named functions (``lorakit.methods()``, ``lorakit.controllers(model)``)
stay callable for one release, with a DeprecationWarning naming the replacement. Removed in 0.2."""
from __future__ import annotations

import sys
import types
import warnings
from typing import Any, Callable


def callable_module(name: str, replacement: str, target: Callable[[], Callable]) -> None:
    """Make module ``name`` callable: calling it warns and forwards to ``target()`` (resolved at call time)."""

    class _Module(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            warnings.warn(f"calling {name}(...) is deprecated and will be removed in lorakit 0.2; use "
                          f"{replacement}(...) ({name} is the module)", DeprecationWarning, stacklevel=2)
            return target()(*args, **kwargs)

    sys.modules[name].__class__ = _Module
