"""The method catalogue as Markdown (``lorakit methods --markdown`` writes docs/methods.md from it)."""
from __future__ import annotations

import dataclasses
import importlib

from .core import REGISTRY


def methods_markdown() -> str:
    importlib.import_module("lorakit.methods")
    fams: dict[str, list] = {}
    for name, cls in sorted(REGISTRY.items()):
        fams.setdefault(cls.family or "other", []).append((name, cls))
    out = ["# Methods", "", f"{len(REGISTRY)} registered methods, generated from the registry "
           "(`lorakit methods --markdown`). Each class docstring holds the formula with shapes and the decisions "
           "taken where the paper was unclear; `lorakit/recipes/methods/<name>.yaml` (`lorakit recipes`) holds the recipe.", ""]
    out += ["| method | family | paper | mergeable | PEFT type | init | layers | options |",
            "|---|---|---|---|---|---|---|---|"]
    for fam in sorted(fams):
        for name, cls in fams[fam]:
            opts = ", ".join(f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
                             for f in dataclasses.fields(cls.Config) if f.init)
            out.append(f"| `{name}` | {fam} | {cls.paper} | {'yes' if cls.mergeable else 'no'} | "
                       f"{cls.peft.peft_type if cls.peft else '— (lorakit file)'} | {cls.init}"
                       f"{' + ' + cls.calibration if cls.calibration else ''} | {', '.join(cls.layers)} | {opts} |")
    out.append("")
    for fam in sorted(fams):
        out += [f"## {fam}", ""]
        for name, cls in fams[fam]:
            doc = (cls.__doc__ or "").strip()
            out += [f"### `{name}`", "", doc, ""]
    return "\n".join(out)
