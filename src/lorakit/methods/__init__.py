"""One file per method. Importing this package registers every method in :data:`lorakit.core.REGISTRY`."""
import importlib
import pkgutil

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

from .._deprecated import callable_module  # noqa: E402

callable_module(__name__, "lorakit.list_methods", lambda: importlib.import_module("lorakit").list_methods)
