"""``lorakit merge CONFIG.yaml``: merge adapters as a mergekit-style YAML says, into a PEFT adapter or a full model.

The YAML is a subset of mergekit's (same key names where mergekit has them) plus lorakit's ``output``::

    base_model: smollm2-135m          # a lorakit model asset (causal LM) or a transformers model directory
    merge_method: ties                # linear | cat | svd | ties | dare_linear | dare_ties | magnitude_prune
                                      # | ties_svd | dare_linear_svd | dare_ties_svd | magnitude_prune_svd | lego
    models:                           # the adapters (PEFT or lorakit adapter directories), each with its weight
      - model: runs/sentiment/adapter
        parameters: {weight: 1.0}
      - model: runs/bbc/adapter
        parameters: {weight: 0.5}
    parameters:                       # the method's parameters (all optional but density for the pruning methods)
      density: 0.5                    # ties, dare_*, magnitude_prune: the share of entries each task keeps
      rank: 16                        # the merged adapter's rank (SVD refactoring; lego: the cluster count)
      majority_sign_method: total     # total | frequency (TIES' sign election)
      lambda: 1.0                     # task arithmetic's scale of the merged update
      space: delta                    # delta (exact, on ΔW) | factors (PEFT's A/B-separate merge)
      flavor: peft                    # peft | mergekit (mergekit's TIES normalisation and DARE rescale)
      seed: 0                         # DARE's random drops
    output:
      path: merged/ties               # a new directory
      format: adapter                 # adapter (a PEFT LoRA) | model (base + merged update, safetensors)
    dtype: float32                    # format model: the saved weights' dtype (float32 | bfloat16 | float16)

Every check that needs no model (keys, types, ranges, that each adapter directory holds an adapter config, that the
output is not an input) runs first and raises ``ConfigError`` naming the key, before any model loads. Outputs are
written to a temporary sibling and renamed into place, so a failed merge leaves no half-written directory.
Not supported from mergekit's schema (refused by name): ``slices``, per-layer gradients (lists), per-model
``density``, ``tokenizer``/``chat_template`` and mergekit-only methods (slerp, della, ...).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, LorakitError

log = logging.getLogger(__name__)

__all__ = ["MergeSpec", "read_spec", "run_merge", "merge_main"]

_TOP = {"base_model", "merge_method", "models", "parameters", "output", "dtype"}
_PARAMS = {"density", "rank", "majority_sign_method", "lambda", "space", "flavor", "seed", "normalize"}
_MERGEKIT_ONLY = {"slices", "tokenizer", "tokenizer_source", "chat_template", "modules", "out_dtype"}


@dataclass
class MergeSpec:
    base_model: str
    method: str
    adapters: list[Path]
    weights: list[float]
    out: Path
    format: str = "adapter"
    dtype: str = "float32"
    params: dict = field(default_factory=dict)


def _num(v, key):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ConfigError(f"{key} must be a finite number, got {v!r}")
    return float(v)


def read_spec(data: dict, where: Path | None = None) -> MergeSpec:
    """Validate a parsed merge YAML (see the module docstring); relative paths are relative to the working
    directory (as in mergekit), not to the YAML file."""
    from ..formats.peft import read_adapter_config
    from .combine import check_options

    if not isinstance(data, dict):
        raise ConfigError("a merge config is a mapping with base_model, merge_method, models and output")
    for k in data:
        if k in _MERGEKIT_ONLY:
            raise ConfigError(f"'{k}' (mergekit) is not supported by lorakit merge; supported keys: {sorted(_TOP)}")
        if k not in _TOP:
            raise ConfigError(f"unknown key '{k}'; valid: {sorted(_TOP)}")
    for k in ("base_model", "merge_method", "models", "output"):
        if k not in data:
            raise ConfigError(f"missing key '{k}'")
    root = Path.cwd()  # relative paths are read from the working directory, as mergekit reads them
    base = data["base_model"]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base_model must be a model asset name or a directory, got {base!r}")
    method = data["merge_method"]
    if not isinstance(method, str):
        raise ConfigError(f"merge_method must be a string, got {method!r}")
    if method == "task_arithmetic":  # mergekit's name
        method = "linear"
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise ConfigError("models must be a non-empty list of {model: ADAPTER_DIR, parameters: {weight: W}}")
    adapters, weights = [], []
    for i, m in enumerate(models):
        where_i = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{where_i} must be a mapping with 'model' (an adapter directory)")
        extra = set(m) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{where_i}: unknown key(s) {sorted(extra)}; valid: model, parameters")
        p = m.get("parameters") or {}
        if not isinstance(p, dict):
            raise ConfigError(f"{where_i}.parameters must be a mapping")
        bad = set(p) - {"weight"}
        if bad:
            raise ConfigError(f"{where_i}.parameters: {sorted(bad)} not supported per model (only weight; put "
                              "density and the rest under the top-level parameters)")
        w = p.get("weight", 1.0)
        if isinstance(w, list):
            raise ConfigError(f"{where_i}.parameters.weight: per-layer gradients (lists) are not supported")
        weights.append(_num(w, f"{where_i}.parameters.weight"))
        path = Path(str(m["model"]))
        path = path if path.is_absolute() else root / path
        try:
            read_adapter_config(path)
        except LorakitError as e:
            raise ConfigError(f"{where_i}.model: {e}") from None
        adapters.append(path.resolve())
    params = dict(data.get("parameters") or {})
    if not isinstance(data.get("parameters") or {}, dict):
        raise ConfigError("parameters must be a mapping")
    for k, v in params.items():
        if k not in _PARAMS:
            raise ConfigError(f"parameters.{k} is not a lorakit merge parameter; valid: {sorted(_PARAMS)}")
        if isinstance(v, list):
            raise ConfigError(f"parameters.{k}: per-layer gradients (lists) are not supported")
    for k in ("density", "lambda"):
        if k in params and params[k] is not None:
            params[k] = _num(params[k], f"parameters.{k}")
    if params.get("normalize") is not None and not isinstance(params["normalize"], bool):
        raise ConfigError(f"parameters.normalize must be true/false, got {params['normalize']!r}")
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"parameters.seed must be an integer, got {seed!r}")
    out = data["output"]
    if isinstance(out, str):
        out = {"path": out}
    if not isinstance(out, dict) or "path" not in out:
        raise ConfigError("output must be a mapping with path (and format: adapter | model)")
    extra = set(out) - {"path", "format"}
    if extra:
        raise ConfigError(f"output: unknown key(s) {sorted(extra)}; valid: path, format")
    fmt = out.get("format", "adapter")
    if fmt not in ("adapter", "model"):
        raise ConfigError(f"output.format={fmt!r}; valid: adapter, model")
    opath = Path(str(out["path"]))
    opath = (opath if opath.is_absolute() else root / opath).resolve()
    for a in adapters:
        if opath == a or a in opath.parents or opath in a.parents:
            raise ConfigError(f"output.path {opath} overlaps the input adapter {a}: write somewhere else")
    dtype = data.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r}; valid: float32, bfloat16, float16")
    if fmt == "adapter" and "dtype" in data and dtype != "float32":
        raise ConfigError("dtype applies to output.format: model (adapters are written in float32)")
    check_options(method, weights, density=params.get("density"), rank=params.get("rank"),
                  space=params.get("space", "delta"), majority_sign=params.get("majority_sign_method", "total"),
                  lam=params.get("lambda", 1.0), flavor=params.get("flavor", "peft"))
    return MergeSpec(base, method, adapters, weights, opath, fmt, dtype, params)


def _load_base(name: str):
    from .. import assets

    if name in assets.MODELS:
        if assets.MODELS[name].kind != "causal-lm":
            raise ConfigError(f"base_model '{name}' is a {assets.MODELS[name].kind} asset; lorakit merge loads causal "
                              "LMs by asset name (give a transformers directory for other models)")
        return assets.load_causal_lm(name)
    p = Path(name)
    if not (p / "config.json").is_file():
        raise ConfigError(f"base_model '{name}' is neither a lorakit model asset ({', '.join(assets.MODELS)}) nor a "
                          "transformers model directory")
    from ..extract import load_pretrained

    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception:  # a model directory without a tokenizer is fine
        tok = None
    return load_pretrained(p), tok


def _write_dir(out: Path, writer) -> None:
    """``writer(tmp_dir)`` into a temporary sibling of ``out``, then renamed into place (an existing ``out`` is
    replaced only after the new one is complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        writer(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_merge(spec: MergeSpec) -> Path:
    """Load the base and the adapters, merge, write the output (see the module docstring)."""
    import torch

    from .. import io
    from ..inject import detach
    from ..merge import merge_and_unload
    from .combine import attach_factors, combine, has_delta_form, merge_deltas, normalize_method
    from .functions import svd_factors

    model, tok = _load_base(spec.base_model)
    names = [f"in{i}" for i in range(len(spec.adapters))]
    for n, d in zip(names, spec.adapters):
        io.load_adapter(model, d, n)
    p = spec.params
    base, svd = normalize_method(spec.method)
    opts = dict(density=p.get("density"), majority_sign=p.get("majority_sign_method", "total"),
                lam=p.get("lambda", 1.0), seed=p.get("seed"))
    exact_dense = (spec.format == "model" and has_delta_form(base) and not svd and p.get("rank") is None
                   and p.get("space", "delta") == "delta")
    if exact_dense:  # a full model needs no refactoring: base + the merged ΔW
        deltas = merge_deltas(model, names, spec.weights, base, flavor=p.get("flavor", "peft"),
                              normalize=p.get("normalize"), **opts)
        # written as an exact (numerical-rank) LoRA and merged by merge_and_unload, which handles tied weights
        attach_factors(model, {path: svd_factors(d, None) for path, d in deltas.items()}, "merged")
        for n in names:
            detach(model, n)
        merge_and_unload(model)
    else:
        if p.get("flavor", "peft") != "peft":
            raise ConfigError("parameters.flavor=mergekit applies to full-model merges in delta space without rank")
        combine(model, names, spec.weights, method=spec.method, rank=p.get("rank"), name="merged",
                space=p.get("space", "delta"), **opts)
        for n in names:
            detach(model, n)
        if spec.format == "adapter":
            _write_dir(spec.out, lambda d: io.save_adapter(model, d, "merged"))
            return spec.out
        merge_and_unload(model)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    model.to(dt)

    def write(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(d)
    _write_dir(spec.out, write)
    return spec.out


EPILOG = """examples:
  lorakit merge merge.yaml                     merge as merge.yaml says (see `lorakit recipes merge-ties`)
  lorakit recipes merge-ties > merge.yaml      a TIES example to edit (also merge-linear, merge-lego)
  lorakit merge merge.yaml --check             validate the YAML only (no model loads)

a minimal merge.yaml (task arithmetic of two adapters into a PEFT LoRA):
  base_model: smollm2-135m
  merge_method: linear
  models:
    - {model: runs/sentiment/adapter, parameters: {weight: 1.0}}
    - {model: runs/bbc/adapter, parameters: {weight: 1.0}}
  output: {path: merged/linear, format: adapter}
methods: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, their _svd variants, lego (docs/merging.md)
"""


def merge_main(argv: list[str] | None = None) -> int:
    from ..config import load_yaml

    ap = argparse.ArgumentParser(prog="lorakit merge", description="Merge adapters as a mergekit-style YAML says, "
                                 "into a PEFT adapter or a merged full model (safetensors).", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the merge YAML (see the examples below)")
    ap.add_argument("--check", action="store_true", help="validate the YAML and the adapter directories only")
    a = ap.parse_args(argv)
    path = Path(a.config)
    if not path.is_file():
        raise ConfigError(f"no merge config at {path}")
    spec = read_spec(load_yaml(path), path)
    if a.check:
        print(f"ok: {spec.method} of {len(spec.adapters)} adapters onto {spec.base_model} -> {spec.out} "
              f"({spec.format})")
        return 0
    out = run_merge(spec)
    print(f"wrote the {spec.method} merge of {len(spec.adapters)} adapters ({spec.format}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(merge_main())
