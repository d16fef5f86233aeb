"""LoRAM: train small, infer large (Zhang et al. 2025, "Train Small, Infer Large: Memory-Efficient LoRA Training for
Large Language Models", ICLR 2025, arXiv:2502.13533; official code junzhang-zj/LoRAM).

1. **Prune** the base with structured pruning (:func:`prune_model`): whole key/value head *groups* of every
   attention block (each kept group keeps its query heads, so grouped-query attention stays consistent) and
   intermediate channels of every MLP. The same number of units is removed in every layer (``ratio`` = the
   fraction removed), so the pruned model is an ordinary Hugging Face model (smaller ``num_attention_heads``,
   ``num_key_value_heads``, ``intermediate_size``; ``head_dim`` kept) that ``lorakit train`` loads like any other.
   QLoRAM = train the pruned model with ``method: qlora`` (NF4 base).
2. **Train** any LoRA-form adapter (a method with ``lowrank()``) on the pruned model, the usual way.
3. **Recover** (:func:`recover_adapter`): the pruned factors are scattered into the full model's shapes, zeros at the
   pruned indices (``fill="zeroA"``, the paper's default) or, for ``fill="normA"``, ``A``'s pruned input columns
   drawn from N(0, 1/r) (the official recovery script's alternative); ``B``'s pruned output rows are always zero.
   Invariants (tested): ``Â`` restricted to the kept input indices equals ``A_p``; the recovered ΔW restricted to
   the kept rows and columns equals the pruned ΔW; with zeroA the pruned rows and columns of ΔW are exactly 0; an
   identity mask (``ratio=0``) recovers the adapter unchanged. The result is a plain LoRA file for the full base
   (PEFT format), servable and mergeable like any LoRA.

Decisions where the paper leaves room: importance is the weight magnitude of each unit (the squared norms of every
row/column the unit owns, summed over the coupled matrices), not LLM-Pruner's first-order Taylor score (which needs
gradients on calibration data); the publisher-side "alignment" continued pre-training of the pruned model is left to
the user (``lorakit train`` with ``method: full`` on text, where available); embeddings, norms and ``lm_head`` are
never pruned (the hidden size is unchanged). Llama-family decoder blocks only (``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``): other architectures get a :class:`~lorakit.errors.ConfigError`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ConfigError, LorakitError

__all__ = ["PruneMask", "prune_model", "recover_adapter", "recover_lowrank", "narrow_block", "MASK_FILE"]

MASK_FILE = "loram_mask.json"


@dataclass
class PruneMask:
    """Which units of the full model a pruned model kept: ``{module path: {"out": [rows] | None, "in": [cols] |
    None}}`` (None: the dimension is not pruned), plus the full model's shape facts (written as JSON)."""

    ratio: float
    modules: dict[str, dict[str, list[int] | None]] = field(default_factory=dict)
    full_shapes: dict[str, list[int]] = field(default_factory=dict)  # path -> [d_out, d_in] of the full model

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"format": "lorakit-loram-mask/1", "ratio": self.ratio, "modules": self.modules,
                                   "full_shapes": self.full_shapes}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruneMask":
        p = Path(path)
        if p.is_dir():
            p = p / MASK_FILE
        if not p.is_file():
            raise ConfigError(f"no LoRAM mask at {p} (prune_model / `lorakit loram prune` writes {MASK_FILE})")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not a LoRAM mask (invalid JSON: {e})") from None
        if d.get("format") != "lorakit-loram-mask/1":
            raise ConfigError(f"{p} is not a LoRAM mask (format {d.get('format')!r})")
        return cls(d["ratio"], d["modules"], d["full_shapes"])


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for path, m in model.named_modules():
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if attn is not None and mlp is not None and all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")) \
                and all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj")):
            out.append((path, m))
    return out


def _keep_top(scores: Tensor, n_keep: int) -> list[int]:
    return sorted(torch.topk(scores, n_keep).indices.tolist())


def prune_model(model: nn.Module, ratio: float, *, prune_heads: bool = True, prune_channels: bool = True
                ) -> tuple[nn.Module, PruneMask]:
    """A structurally pruned deep copy of a Llama-family ``model`` and the :class:`PruneMask` (``model`` is left
    untouched). ``ratio`` in [0, 1): the fraction of key/value head groups and MLP channels removed per layer."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"loram: ratio={ratio} must be in [0, 1) (the fraction of heads/channels removed)")
    from .attachments import attachments

    if attachments(model):
        raise LorakitError("loram: prune the base model before attaching adapters (this model has adapters)")
    cfg = getattr(model, "config", None)
    blocks = _blocks(model)
    if cfg is None or not blocks:
        raise ConfigError(f"loram: {type(model).__name__} has no Llama-style decoder blocks (self_attn.q/k/v/o_proj "
                          "and mlp.gate/up/down_proj); LoRAM's structured pruning supports Llama-family models")
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h
    group = n_h // n_kv
    inter = cfg.intermediate_size
    keep_kv = n_kv if not prune_heads else max(1, round(n_kv * (1 - ratio)))
    keep_ch = inter if not prune_channels else max(1, round(inter * (1 - ratio)))
    small = copy.deepcopy(model)
    mask = PruneMask(ratio)
    for path, blk in _blocks(small):
        a, m = blk.self_attn, blk.mlp
        pre = f"{path}." if path else ""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mask.full_shapes[f"{pre}self_attn.{name}"] = list(getattr(a, name).weight.shape)
        for name in ("gate_proj", "up_proj", "down_proj"):
            mask.full_shapes[f"{pre}mlp.{name}"] = list(getattr(m, name).weight.shape)
        with torch.no_grad():
            # attention: one score per key/value group (its k, v rows, its query heads' q rows and o columns)
            def rows(w, n_units):  # (n_units,) squared norms of row blocks
                return w.float().pow(2).view(n_units, -1).sum(1)
            s_kv = rows(a.k_proj.weight, n_kv) + rows(a.v_proj.weight, n_kv)
            s_q = rows(a.q_proj.weight, n_h) + a.o_proj.weight.float().pow(2).view(-1, n_h, hd).sum((0, 2))
            s_kv = s_kv + s_q.view(n_kv, group).sum(1)
            kv = _keep_top(s_kv, keep_kv)
            s_ch = m.gate_proj.weight.float().pow(2).sum(1) + m.up_proj.weight.float().pow(2).sum(1) \
                + m.down_proj.weight.float().pow(2).sum(0)
            ch = _keep_top(s_ch, keep_ch)
        mask.modules.update({pre + k: v for k, v in narrow_block(blk, kv, ch, n_h, n_kv, hd, inter).items()})
    small.config.num_attention_heads = keep_kv * group
    small.config.num_key_value_heads = keep_kv
    small.config.head_dim = hd
    small.config.intermediate_size = keep_ch
    for _, blk in _blocks(small):
        if hasattr(blk.self_attn, "num_key_value_groups"):
            blk.self_attn.num_key_value_groups = group
    return small, mask


def narrow_block(blk: nn.Module, kv_groups: list[int], channels: list[int], n_h: int, n_kv: int, hd: int,
                 inter: int) -> dict[str, dict[str, list[int] | None]]:
    """Physically keep key/value groups ``kv_groups`` (with their query heads) and MLP ``channels`` of one Llama
    decoder block; returns the per-matrix kept indices (None where a dimension is whole)."""
    group = n_h // n_kv
    q_rows = [(g * group + j) * hd + i for g in kv_groups for j in range(group) for i in range(hd)]
    kv_rows = [g * hd + i for g in kv_groups for i in range(hd)]
    full_q, full_kv = n_h * hd, n_kv * hd
    out = {}
    for name, out_idx, in_idx in (("self_attn.q_proj", q_rows, None), ("self_attn.k_proj", kv_rows, None),
                                  ("self_attn.v_proj", kv_rows, None), ("self_attn.o_proj", None, q_rows),
                                  ("mlp.gate_proj", channels, None), ("mlp.up_proj", channels, None),
                                  ("mlp.down_proj", None, channels)):
        _narrow_linear(blk.get_submodule(name), out_idx, in_idx)
        full_out = {"self_attn.q_proj": full_q, "self_attn.k_proj": full_kv, "self_attn.v_proj": full_kv,
                    "mlp.gate_proj": inter, "mlp.up_proj": inter}.get(name)
        full_in = {"self_attn.o_proj": full_q, "mlp.down_proj": inter}.get(name)
        out[name] = {"out": out_idx if out_idx is not None and len(out_idx) < full_out else None,
                     "in": in_idx if in_idx is not None and len(in_idx) < full_in else None}
    return out


def _narrow_linear(lin: nn.Linear, out_idx: list[int] | None, in_idx: list[int] | None) -> None:
    with torch.no_grad():
        w = lin.weight
        if out_idx is not None:
            w = w[out_idx]
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias[out_idx].clone(), requires_grad=lin.bias.requires_grad)
        if in_idx is not None:
            w = w[:, in_idx]
        lin.weight = nn.Parameter(w.clone(), requires_grad=lin.weight.requires_grad)
        lin.out_features, lin.in_features = lin.weight.shape


def save_pruned(small: nn.Module, mask: PruneMask, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write the pruned model as a Hugging Face directory (``lorakit train model.name=<dir>`` loads it) with the
    mask next to it; atomic (a temporary directory renamed into place)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"loram: {out} exists and is not empty; choose a new output directory")
    tmp = Path(tempfile.mkdtemp(prefix=".loram-", dir=out.parent if out.parent.exists() else None))
    try:
        small.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        mask.save(tmp / MASK_FILE)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _scatter(t: Tensor, dim: int, idx: list[int] | None, full: int, fill: Tensor | None = None) -> Tensor:
    if idx is None:
        if t.shape[dim] != full:
            raise LorakitError(f"loram: factor has {t.shape[dim]} along dim {dim}, the full model {full}, but the "
                               "mask says this dimension was not pruned")
        return t
    if t.shape[dim] != len(idx):
        raise LorakitError(f"loram: factor has {t.shape[dim]} along dim {dim} but the mask kept {len(idx)} units: "
                           "the adapter was not trained on the model this mask describes")
    shape = list(t.shape)
    shape[dim] = full
    out = fill.clone() if fill is not None else t.new_zeros(shape)
    index = torch.tensor(idx, dtype=torch.long)
    return out.index_copy(dim, index, t)


def recover_lowrank(A: Tensor, B: Tensor, entry: dict, full_shape: list[int], *, fill: str = "zeroA",
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Scatter one module's pruned factors ``A`` (r, d_in_p), ``B`` (d_out_p, r) into the full shapes."""
    if fill not in ("zeroA", "normA"):
        raise ConfigError(f"loram: fill={fill!r}; valid: zeroA (the paper's default), normA")
    d_out, d_in = full_shape
    r = A.shape[0]
    base_A = None
    if fill == "normA" and entry.get("in") is not None:
        base_A = torch.randn(r, d_in, generator=generator, dtype=torch.float32).to(A.dtype) / r ** 0.5
    return _scatter(A, 1, entry.get("in"), d_in, base_A), _scatter(B, 0, entry.get("out"), d_out)


def recover_adapter(small_model: nn.Module, full_model: nn.Module, mask: PruneMask, *, name: str = "default",
                    fill: str = "zeroA", seed: int = 0) -> None:
    """Attach to ``full_model`` a LoRA adapter ``name`` recovered from the adapter ``name`` trained on the pruned
    ``small_model`` (any method whose adapters have ``lowrank()``; the result is a plain LoRA at each adapter's rank
    and scale). Save it with :func:`lorakit.save_adapter`."""
    from .convert import attach_plain_lora, plain_lowrank

    facts, r, s = plain_lowrank(small_model, name, "loram")
    missing = [p for p in facts if p not in mask.modules]
    if missing:
        raise LorakitError(f"loram: '{missing[0]}' is not in the mask; was the adapter trained on this pruned model?")
    full = attach_plain_lora(full_model, facts, r, s, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, lr in facts.items():
            A, B = recover_lowrank(lr.A.detach(), lr.B.detach(), mask.modules[path], mask.full_shapes[path],
                                   fill=fill, generator=g)
            tgt = full[path]
            if tuple(tgt.lora_A.weight.shape) != tuple(A.shape) or tuple(tgt.lora_B.weight.shape) != tuple(B.shape):
                raise LorakitError(f"loram: '{path}' of the full model is {tuple(tgt.lora_B.weight.shape[:1])}x"
                                   f"{tuple(tgt.lora_A.weight.shape[1:])}, the mask says {mask.full_shapes[path]}")
            tgt.lora_A.weight.copy_(A)
            tgt.lora_B.weight.copy_(B)


def prune_files(model: str, ratio: float, out_dir: str | os.PathLike, **kw) -> tuple[Path, PruneMask]:
    """``lorakit loram prune``: load ``model`` (a lorakit model name or HF directory), prune, write the pruned HF
    directory with its mask. Options are checked before the model loads."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"loram: ratio={ratio} must be in [0, 1) (the fraction of heads/channels removed)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"loram: {out} exists and is not empty; choose a new output directory")
    from .assets import load_causal_lm

    full, tok = load_causal_lm(model)
    small, mask = prune_model(full, ratio, **kw)
    return save_pruned(small, mask, out, tokenizer=tok), mask


def recover_files(pruned_dir: str | os.PathLike, adapter_dir: str | os.PathLike, base: str,
                  out_dir: str | os.PathLike, *, fill: str = "zeroA", seed: int = 0) -> Path:
    """``lorakit loram recover``: the adapter trained on ``pruned_dir`` as a LoRA file for the full ``base``."""
    if fill not in ("zeroA", "normA"):
        raise ConfigError(f"loram: fill={fill!r}; valid: zeroA (the paper's default), normA")
    mask = PruneMask.load(pruned_dir)
    from . import load_adapter, save_adapter
    from .assets import load_causal_lm

    small, _ = load_causal_lm(str(pruned_dir))
    small = copy.deepcopy(small)  # load_causal_lm caches per process: never attach to the shared copy
    load_adapter(small, adapter_dir)
    full, _ = load_causal_lm(base)
    full = copy.deepcopy(full)
    recover_adapter(small, full, mask, fill=fill, seed=seed)
    return Path(save_adapter(full, out_dir) or out_dir)
