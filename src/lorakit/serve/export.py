"""``lorakit export``: write an adapter in the forms other servers load.

* ``--format vllm``: a plain PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) as
  ``vllm serve --enable-lora --lora-modules name=DIR`` loads it. vLLM serves LoRA factors only: no DoRA magnitude
  (vllm#10849, open), no ``modules_to_save``/full weights (lm_head, embed_tokens are rejected), ranks up to
  ``--max-lora-rank``. The scale is folded into B (``lora_alpha = r``, so vLLM's ``alpha/r`` is 1 for every module,
  with per-module ranks kept in ``rank_pattern``/``alpha_pattern`` for PEFT). Any method whose ``lowrank()`` exists
  exports; residual methods (PiSSA) become the exact rank-2r LoRA on the original base. DoRA is refused.
* ``--format gguf``: a llama.cpp LoRA adapter (``general.type=adapter``, ``adapter.type=lora``,
  ``adapter.lora.alpha``; tensors ``blk.N.attn_q.weight.lora_a`` (numpy shape (r, n_in)) and ``.lora_b``
  ((n_out, r))). llama.cpp scales each pair by ``alpha / r``; lorakit writes ``alpha`` = the largest rank and folds
  each module's remaining factor into ``lora_b``. For Llama/Mistral the q/k rows are permuted the way llama.cpp's
  converter permutes the base q/k weights (rotary halves interleaved), so the adapter matches a llama.cpp base.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import logging
import re
import sys
from pathlib import Path

import torch

from ..errors import AdapterFileError, ConfigError, LorakitError
from ..formats.peft import read_adapter_config

log = logging.getLogger(__name__)

__all__ = ["export_adapter", "export_main", "GGUF_NAMES"]

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
_PERMUTE_ARCHS = {"llama", "mistral"}
_GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _lowrank_of(model, adapter_dir: Path, target: str):
    from .bank import install, read_served

    bank = install(model)
    sa = read_served(bank, adapter_dir, "export")
    if any(g is not None for _, _, g in sa.layers.values()):
        raise ConfigError(f"{adapter_dir} is a DoRA adapter: {target} does not serve DoRA (its magnitude vector "
                          "rescales every output row, which a plain LoRA cannot express). Merge it into the base "
                          "(lorakit.merge_and_unload) and serve the merged model instead")
    return sa


def _permute_rows(B: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k layout: within each head, the two rotary halves are interleaved."""
    d = B.shape[0]
    return B.reshape(n_head, 2, d // n_head // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def export_adapter(adapter_dir: str | Path, out: str | Path, fmt: str, model=None, base: str | None = None) -> Path:
    """Export ``adapter_dir`` (lorakit/PEFT format) for vLLM (``fmt="vllm"``) or llama.cpp (``fmt="gguf"``).

    ``model``: the base model (or ``base``: a local HF directory / ``smollm2-135m``) the adapter applies to.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    if fmt not in ("vllm", "gguf"):
        raise ConfigError(f"unknown export format {fmt!r}; use 'vllm' or 'gguf'")
    _check_out(adapter_dir, out, fmt)
    if model is None:
        if base is None:
            raise ConfigError("export needs the base model (--base): DoRA/PiSSA and the GGUF layout depend on it")
        from .server import load_base_model

        model, _ = load_base_model(base)
    import copy

    model = copy.deepcopy(model)
    sa = _lowrank_of(model, adapter_dir, "vLLM" if fmt == "vllm" else "llama.cpp")
    conf_in = read_adapter_config(adapter_dir)
    base_name = conf_in.get("base_model_name_or_path") or getattr(model.config, "_name_or_path", None)
    ranks = {p: A.shape[0] for p, (A, _, _) in sa.layers.items()}
    r_max = max(ranks.values())
    if fmt == "vllm":
        from ..formats.peft_lora import PeftLoraConfig, write_lora

        # sB carries each module's scale: alpha = r per module makes every PEFT/vLLM scale 1
        cfg = PeftLoraConfig.for_modules(ranks, {p: r for p, r in ranks.items()},
                                         target_modules=sorted({p.rsplit(".", 1)[-1] for p in ranks}),
                                         task_type="CAUSAL_LM", base_model_name_or_path=base_name)
        factors = {p: (A, sB) for p, (A, sB, _) in sa.layers.items()}
        _replace_dir(out, lambda tmp: write_lora(tmp, cfg, factors))
        return out

    import gguf
    import numpy as np

    mt = getattr(model.config, "model_type", None)
    if mt not in _GGUF_ARCHS:
        raise ConfigError(f"GGUF export supports Llama-family bases ({', '.join(sorted(_GGUF_ARCHS))}); this base is "
                          f"{mt!r}")
    n_head = model.config.num_attention_heads
    n_kv = getattr(model.config, "num_key_value_heads", None) or n_head
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_gguf(tmp, gguf, np, mt, model, sa, ranks, r_max, base_name, n_head, n_kv)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _write_gguf(path, gguf, np, mt, model, sa, ranks, r_max, base_name, n_head, n_kv) -> None:
    w = gguf.GGUFWriter(str(path), _GGUF_ARCHS[mt])
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r_max))
    if base_name:
        w.add_string("general.name", f"lorakit adapter for {Path(str(base_name)).name}")
    pat = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.[a-z_]+|mlp\.[a-z_]+)$")
    for p in sorted(ranks, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]):
        A, sB, _ = sa.layers[p]
        m = pat.search(p)
        if m is None or m.group(2) not in GGUF_NAMES:
            raise ConfigError(f"module '{p}' has no llama.cpp tensor name (supported: {', '.join(GGUF_NAMES)})")
        i, kind = int(m.group(1)), m.group(2)
        B = sB.float() * (ranks[p] / float(r_max))  # llama.cpp multiplies by alpha / r = r_max / r
        if mt in _PERMUTE_ARCHS and kind == "self_attn.q_proj":
            B = _permute_rows(B, n_head)
        elif mt in _PERMUTE_ARCHS and kind == "self_attn.k_proj":
            B = _permute_rows(B, n_kv)
        name = f"blk.{i}.{GGUF_NAMES[kind]}.weight"
        w.add_tensor(name + ".lora_a", np.ascontiguousarray(A.float().numpy()))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(B.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _check_out(adapter_dir: Path, out: Path, fmt: str) -> None:
    """``out`` may not be the source directory, lie inside it or contain it (the export would overwrite or mix
    with the files it reads); a vLLM export is a directory, a GGUF export a file."""
    src, dst = adapter_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConfigError(f"--out {out} overlaps the adapter being exported ({adapter_dir}): choose a directory "
                          "outside it (and not one that contains it)")
    if fmt == "vllm" and dst.exists() and not dst.is_dir():
        raise ConfigError(f"--out {out} is a file; a vLLM export is a directory")
    if fmt == "gguf" and dst.is_dir():
        raise ConfigError(f"--out {out} is a directory; a GGUF export is a file (e.g. {out / 'adapter.gguf'})")


def _replace_dir(out: Path, write) -> None:
    """Write a directory atomically: into a temporary sibling, then renamed into place (an existing ``out`` is
    moved aside first and removed only once the new one is in place), so a failure leaves ``out`` as it was."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    old = None
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of ``lorakit export`` (the CLI calls this with the arguments after ``export``)."""
    p = argparse.ArgumentParser(prog="lorakit export", description="Export an adapter for vLLM (PEFT LoRA) or "
                                "llama.cpp (GGUF LoRA).")
    p.add_argument("adapter", help="adapter directory (lorakit or PEFT format)")
    p.add_argument("--format", required=True, choices=["vllm", "gguf"])
    p.add_argument("--base", required=True, help="base model: local HF directory or 'smollm2-135m'")
    p.add_argument("--out", required=True, help="output directory (vllm) or .gguf file (gguf)")
    a = p.parse_args(argv)
    try:
        out = export_adapter(a.adapter, a.out, a.format, base=a.base)
    except (LorakitError, OSError) as e:
        print(f"lorakit export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
