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
  llama.cpp loads ``adapter.type=lora`` only (no DoRA magnitude).

What neither consumer can represent is refused with a :class:`ConfigError` saying why and what to do instead,
before anything is written: methods without a low-rank form (merge them into the base), routing/gating mixtures
(input-dependent, not mergeable: use them from PyTorch), DoRA magnitudes, bases replaced on load without an exact
low-rank residual (QLoRA, LQ-LoRA, ...), trained biases / whole modules / ``lora_bias``, and LoRA on embeddings or
convolutions. Each exported module's low-rank form is checked against the adapter's own forward on a probe input,
so nothing it computes is dropped silently.
"""
from __future__ import annotations

import argparse
import json
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


def _refuse(adapter_dir: Path, target: str, why: str, instead: str) -> None:
    raise ConfigError(f"cannot export {adapter_dir} for {target}: {why}. {instead}")


_MERGE = ("Merge it into the base instead (lorakit.merge_and_unload(model), then save the model) and serve the "
          "merged model")


@torch.no_grad()
def _lowrank_of(model, adapter_dir: Path, target: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter as a plain LoRA on the ORIGINAL base weights of ``model``: ``{module path: (A (r, d_in),
    sB (d_out, r))}`` with the scale folded into B, so ``W + sB @ A`` is the adapted weight.

    The adapter is loaded with :func:`lorakit.load_adapter` on a copy of ``model`` (so shared bases, residual inits
    and data-driven inits are rebuilt exactly as for training), and each module's ``lowrank()`` is checked against
    the module's own forward on a probe input: whatever the low-rank form does not capture (a bias on B, a
    magnitude vector, routing, a replaced base weight) is refused with the reason, never exported half-right."""
    import copy

    from .. import attached, adapters, load_adapter
    from ..core import get_method

    m = copy.deepcopy(model).float().eval()  # fp32: the factors are written in fp32, the probe is exact
    load_adapter(m, adapter_dir, "export")
    cfg = attached(m)["export"]["config"]
    method = get_method(cfg.method)
    name = f"method '{method.name}'"
    if cfg.trainable:
        _refuse(adapter_dir, target, f"the adapter trains whole modules ({', '.join(cfg.trainable)}; PEFT "
                "modules_to_save), and a LoRA adapter file carries only low-rank factors", _MERGE)
    if cfg.bias != "none":
        _refuse(adapter_dir, target, f"the adapter trains biases (bias={cfg.bias!r}), and a LoRA adapter file "
                "carries only low-rank factors", _MERGE)
    originals = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, a in adapters(m, "export"):
        if a.view.kind != "linear":
            _refuse(adapter_dir, target, f"'{path}' is a {a.view.kind} layer; lorakit exports LoRA on linear layers "
                    "only (an embedding/convolution LoRA has no place in the exported file)",
                    "Train the adapter on linear layers only (e.g. targets='all-linear'), or " + _MERGE[0].lower()
                    + _MERGE[1:])
        lr = a.lowrank()
        if lr is None:
            if not method.mergeable:
                _refuse(adapter_dir, target, f"{name} has no low-rank form: its output depends on the input "
                        "(routing/gating over several experts), which a LoRA adapter (one fixed low-rank update per "
                        "layer) cannot express, and it cannot be merged into the base either",
                        "Use it from PyTorch instead (lorakit.load_adapter on the base model)")
            _refuse(adapter_dir, target, f"{name} has no low-rank form at '{path}' (its update is not "
                    "ΔW = s·B·A, so it is no LoRA)", _MERGE)
        if lr.magnitude is not None:
            _refuse(adapter_dir, target, f"{name} is a DoRA adapter: its magnitude vector rescales every output "
                    f"row, which a plain LoRA cannot express and {target} does not load", _MERGE)
        orig = originals[path]
        A, B = lr.A.detach().float(), lr.B.detach().float() * float(lr.scale)
        x = torch.randn(4, a.view.d_in, generator=g)
        y0 = torch.nn.functional.linear(x, orig.weight.float(), None if orig.bias is None else orig.bias.float())
        if not torch.allclose(a.base(x).float(), y0, rtol=1e-5, atol=1e-6):
            lr0 = a.initial_lowrank()
            if lr0 is None:
                _refuse(adapter_dir, target, f"{name} replaces the base weights of '{path}' when it is loaded (e.g. "
                        "quantised or residual), and that change is no low-rank term on the original base",
                        _MERGE)
            # residual init: W' = W − s₀B₀A₀, so W' + sBA = W + [sB | −s₀B₀][A; A₀]
            A = torch.cat([A, lr0.A.detach().float()], 0)
            B = torch.cat([B, -lr0.B.detach().float() * float(lr0.scale)], 1)
        want = a(x, a.base(x)).float()
        got = y0 + (x @ A.T) @ B.T
        err = (want - got).abs().max().item()
        if not (err <= 1e-4 * max(1.0, want.abs().max().item())):
            _refuse(adapter_dir, target, f"{name} at '{path}' computes something its low-rank form does not (max "
                    f"difference {err:.3g} on a probe input; e.g. a bias on lora_B, lora_bias=True)", _MERGE)
        out[path] = (A.contiguous(), B.contiguous())
    if not out:
        raise AdapterFileError(f"{adapter_dir}: the adapter has no weights to export")
    return out


def _refuse_unservable(conf: dict, adapter_dir: Path, target: str) -> None:
    """Adapters the target server does not document loading, refused before any work with what to do instead.

    * ``target_parameters`` (LoRA on fused MoE expert weights): vLLM's documentation does not list PEFT's
      ParamWrapper layout (one ``(E·r, d_in)``/``(d_out, r·E)`` pair per expert stack); its loader's support is
      per model and has dropped such adapters silently or failed on shapes (vllm PRs 41384, 52194, 47088), and
      llama.cpp has no expert LoRA. Merged weights serve everywhere.
    * ``trainable_token_indices``: neither server loads replaced embedding rows."""
    if conf.get("target_parameters"):
        raise ConfigError(f"{adapter_dir} adapts parameters by name (target_parameters={conf['target_parameters']}, "
                          f"LoRA on fused MoE expert weights): {target} does not document loading that layout. "
                          "Merge it into the base (lorakit.merge_and_unload, then save_pretrained) and serve the "
                          "merged model instead")
    if conf.get("trainable_token_indices"):
        raise ConfigError(f"{adapter_dir} trains embedding rows (trainable_token_indices): {target} loads LoRA "
                          "factors only. Merge it into the base (lorakit.merge_and_unload) and serve the merged model")


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
    _refuse_unservable(read_adapter_config(adapter_dir), adapter_dir, "vLLM" if fmt == "vllm" else "llama.cpp")
    if model is None:
        if base is None:
            raise ConfigError("export needs the base model (--base): DoRA/PiSSA and the GGUF layout depend on it")
        from .server import load_base_model

        model, _ = load_base_model(base)
    layers = _lowrank_of(model, adapter_dir, "vLLM" if fmt == "vllm" else "llama.cpp")
    conf_in = read_adapter_config(adapter_dir)
    base_name = conf_in.get("base_model_name_or_path") or getattr(model.config, "_name_or_path", None)
    ranks = {p: A.shape[0] for p, (A, _) in layers.items()}
    r_max = max(ranks.values())
    if fmt == "vllm":
        from ..formats.peft_lora import PeftLoraConfig, write_lora

        # sB carries each module's scale: alpha = r per module makes every PEFT/vLLM scale 1
        cfg = PeftLoraConfig.for_modules(ranks, {p: r for p, r in ranks.items()},
                                         target_modules=sorted({p.rsplit(".", 1)[-1] for p in ranks}),
                                         task_type="CAUSAL_LM", base_model_name_or_path=base_name)
        _replace_dir(out, lambda tmp: write_lora(tmp, cfg, layers))
        return out

    import gguf
    import numpy as np

    mt = getattr(model.config, "model_type", None)
    if mt not in _GGUF_ARCHS:
        raise ConfigError(f"GGUF export supports Llama-family bases ({', '.join(sorted(_GGUF_ARCHS))}); this base is "
                          f"{mt!r}. Merge the adapter into the base instead (lorakit.merge_and_unload(model)) and "
                          "convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    n_head = model.config.num_attention_heads
    n_kv = getattr(model.config, "num_key_value_heads", None) or n_head
    pat = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.[a-z_]+|mlp\.[a-z_]+)$")
    where = {}
    for p in ranks:
        m = pat.search(p)
        if m is None or m.group(2) not in GGUF_NAMES:
            raise ConfigError(f"cannot export {adapter_dir} for llama.cpp: module '{p}' has no llama.cpp LoRA tensor "
                              f"name (llama.cpp adapters name the base GGUF's tensors; supported: "
                              f"{', '.join(GGUF_NAMES)}). Train the adapter on those projections only, or merge it "
                              "into the base instead (lorakit.merge_and_unload(model)) and convert the merged model")
        where[p] = (int(m.group(1)), m.group(2))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_gguf(tmp, gguf, np, mt, layers, where, ranks, r_max, base_name, n_head, n_kv)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _write_gguf(path, gguf, np, mt, layers, where, ranks, r_max, base_name, n_head, n_kv) -> None:
    w = gguf.GGUFWriter(str(path), _GGUF_ARCHS[mt])
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r_max))
    if base_name:
        w.add_string("general.name", f"lorakit adapter for {Path(str(base_name)).name}")
    for p in sorted(ranks, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]):
        A, sB = layers[p]
        i, kind = where[p]
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
