"""Which modules an adapter goes on. Semantics follow PEFT exactly (``check_target_module_exists``):

* a ``str`` is ``re.fullmatch`` against the full dotted module path;
* a ``list`` matches an exact path or a dotted suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
* ``"all-linear"`` is every Linear/Conv1D except the output head (and a sequence-classification head);
* ``"all-attention"`` (lorakit's own) is every Linear/Conv1D inside an attention block: a module whose path has a
  component naming attention (``self_attn``, ``attention``, ``attn``, ``SelfAttention``, ...) before its own name.
  It is derived from the model, not from a table, so one recipe fits Llama (q/k/v/o_proj), BERT (query, key,
  value, attention.output.dense), GPT-2 (c_attn, c_proj) and any other architecture;
* ``exclude`` (same forms) is applied first; ``layers`` keeps only the given layer indices
  (the first number after ``layers_pattern``, default any of PEFT's layer-list names).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .core import Adapted, ModulesToSave, adaptable
from .errors import TargetError

# Per-architecture defaults when no targets are given (PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
}
LAYER_LIST_NAMES = ("layers", "h", "block", "blocks", "layer")
_CLS_HEADS = ("score", "classifier")
_ATTN = re.compile(r"attn|attention", re.I)


def _in_attention(path: str) -> bool:
    return any(_ATTN.search(c) for c in path.split(".")[:-1])


def _spec_match(path: str, spec: str | Iterable[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


def _layer_index(path: str, pattern: str | list[str] | None) -> int | None:
    names = [pattern] if isinstance(pattern, str) else (pattern or LAYER_LIST_NAMES)
    for n in names:
        m = re.match(rf".*?\.{re.escape(n)}\.(\d+)(\.|$)", "." + path)
        if m:
            return int(m.group(1))
    return None


def _output_heads(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for path, m in model.named_modules():
        inner = m.base_layer if isinstance(m, Adapted) else m
        if out is not None and inner is out:
            heads.add(path)
        if path.split(".")[-1] in _CLS_HEADS + ("lm_head",):
            heads.add(path)
    return heads


def default_targets(model: nn.Module) -> list[str] | str:
    """PEFT's per-architecture default for known model types; otherwise every projection inside an attention
    block (``"all-attention"``) when the model has any; otherwise an error asking for targets."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[mt]
    if any(adaptable(m) in ("linear", "conv1d") and _in_attention(p) for p, m in model.named_modules()):
        return "all-attention"
    raise TargetError("no `targets` given and no default is known for "
                      f"{'model type ' + repr(mt) if mt else type(model).__name__}; pass targets=\"all-linear\", "
                      "a regex, or a list of module names")


def match(model: nn.Module, targets, exclude=None, layers: list[int] | None = None,
          layers_pattern: str | list[str] | None = None, skip: Iterable[str] = ()) -> list[str]:
    """Paths of the modules that ``targets`` selects (in ``named_modules`` order). Raises if none match."""
    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, (list, tuple, set)) and not targets:
        raise TargetError("`targets` is an empty list")
    all_linear = targets in ("all-linear", "all-attention")
    attention = targets == "all-attention"
    heads = _output_heads(model) if all_linear else set()
    skip = set(skip)
    found: list[str] = []
    for path, m in model.named_modules():
        if not path or isinstance(m, ModulesToSave) or any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if ".adapters." in f".{path}." or path.endswith(".base_layer") or ".base_layer." in path:
            continue  # inside a host
        inner = m.base_layer if isinstance(m, Adapted) else m
        kind = adaptable(inner)
        if kind is None:
            continue
        if exclude and _spec_match(path, exclude):
            continue
        if all_linear:
            if kind not in ("linear", "conv1d") or path in heads or (attention and not _in_attention(path)):
                continue
        elif not _spec_match(path, targets):
            continue
        if layers is not None:
            idx = _layer_index(path, layers_pattern)
            if idx is None or idx not in layers:
                continue
        found.append(path)
    if not found:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if adaptable(m)})
        sample = [p for p, m in model.named_modules() if adaptable(m)][:6]
        raise TargetError(f"targets={targets!r} matched no module (exclude={exclude!r}, layers={layers!r}). "
                          f"Adaptable module types here: {kinds}; for example: {sample}")
    return found


def pattern_lookup(path: str, patterns: dict[str, dict]) -> dict:
    """Merge the override dicts whose key matches ``path`` (PEFT's rank_pattern rule: the key matches the whole path
    or a dotted suffix as a regex). Earlier keys win, as in PEFT."""
    out: dict = {}
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            for k, v in val.items():
                out.setdefault(k, v)
    return out


def resolve_trainable(model: nn.Module, names: Iterable[str], strict: bool = True) -> list[str]:
    """``trainable`` / PEFT ``modules_to_save`` names -> module paths, as PEFT matches them: a path equal to the
    name or ending with ``"." + name`` (``"norm"`` finds ``model.norm`` but not ``input_layernorm``: whole path components), skipping lorakit's own wrappers and copies. A name that
    matches nothing is a :class:`TargetError` (``strict=False``, for PEFT files: skipped, as PEFT does with its
    task defaults such as ``["classifier", "score"]``)."""
    out: list[str] = []
    for t in names:
        hits = [p for p, m in model.named_modules()
                if p and (p == t or p.endswith("." + t)) and not isinstance(m, Adapted)
                and ".base_layer" not in p and ".adapters." not in p and ".copies." not in p
                and ".original_module" not in p]
        if not hits and strict:
            raise TargetError(f"trainable module '{t}' matches no module of {type(model).__name__} (give a module "
                              "path or its last components, e.g. 'score' or 'model.norm')")
        out += [p for p in hits if p not in out]
    return out
