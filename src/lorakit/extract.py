"""LoRA extraction: the PEFT LoRA that best approximates a fully fine-tuned model.

For every linear layer (``nn.Linear``, transformers ``Conv1D``) whose weight differs between the base and the tuned
model, ``ΔW = W_tuned − W_base`` (a (d_out, d_in) matrix) is factorised by a truncated SVD ``ΔW ≈ U_k S_k V_kᵀ``,
which by Eckart–Young is the best rank-k approximation in Frobenius (and spectral) norm. The factors are written
balanced, ``B = U_k √S_k`` (d_out, k) and ``A = √S_k V_kᵀ`` (k, d_in), with ``lora_alpha = k`` per module so PEFT's
scale ``alpha/r`` is 1 and ``scale·B A`` is the truncated ``ΔW``.

The rank is either fixed (``rank=r``; capped by ``min(d_out, d_in)``) or, per layer, the smallest ``k`` whose
singular values hold at least ``energy`` of ``‖ΔW‖_F²`` (``Σ_{i≤k} s_i² ≥ energy · Σ s_i²``), optionally capped by
``max_rank``. Different ranks are written as PEFT's ``rank_pattern``/``alpha_pattern`` (exact paths).

A bias that differs is carried by PEFT's ``lora_bias`` (``lora_B.bias`` = ``b_tuned − b_base``, zero for the
adapted layers whose bias did not change); ``lora_bias`` is then set for the whole file, as PEFT's option is global.
A layer whose bias changed but whose weight did not gets a rank-1 pair of zeros (PEFT needs ``r ≥ 1``).
Every other parameter that differs (embeddings, norms, a non-linear head) cannot be expressed by a LoRA on linear
layers: it is listed in :attr:`Extracted.skipped` and logged, never silently dropped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .core import LayerView, adaptable
from .errors import ConfigError
from .formats.peft import PREFIX, write_adapter_dir
from .formats.peft_lora import PeftLoraConfig
from .targets import _spec_match

log = logging.getLogger(__name__)

__all__ = ["extract_lora", "Extracted", "energy_rank", "load_pretrained"]


@dataclass
class Extracted:
    """The result of :func:`extract_lora`: per module path its factors ``(A (k, d_in), B (d_out, k))`` (scale 1),
    the bias change (or None), the rank, the relative Frobenius error ``‖ΔW − BA‖/‖ΔW‖`` and the energy kept."""

    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    biases: dict[str, Tensor | None] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # parameters that differ but no LoRA on a linear can express
    fan_in_fan_out: bool = False  # transformers Conv1D layers (PEFT sets the flag per layer; A, B as for Linear)

    def config(self) -> PeftLoraConfig:
        """The PEFT LoRA config of the file: each module its rank, ``alpha = rank`` (scale 1)."""
        if not self.factors:
            raise ConfigError("no linear layer differs between the base and the tuned model: nothing to extract")
        extra = {"lora_bias": any(b is not None for b in self.biases.values())}
        if self.fan_in_fan_out:
            extra["fan_in_fan_out"] = True
        return PeftLoraConfig.for_modules(self.ranks, {p: float(k) for p, k in self.ranks.items()}, **extra)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        cfg = self.config()
        state: dict[str, Tensor] = {}
        for p, (A, B) in self.factors.items():
            state[f"{PREFIX}{p}.lora_A.weight"] = A.contiguous()
            state[f"{PREFIX}{p}.lora_B.weight"] = B.contiguous()
            if cfg.extra["lora_bias"]:
                b = self.biases.get(p)
                state[f"{PREFIX}{p}.lora_B.bias"] = (b if b is not None else torch.zeros(B.shape[0])).contiguous()
        return write_adapter_dir(directory, cfg.to_dict(), state)


def energy_rank(s: Tensor, energy: float) -> int:
    """The smallest k with ``Σ_{i≤k} s_i² ≥ energy · Σ s_i²`` (singular values ``s`` sorted descending)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    # a tiny relative slack so an exact-rank difference (trailing s_i at rounding level) asks for no extra rank
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if p and adaptable(m) in ("linear", "conv1d")}


@torch.no_grad()
def extract_lora(base: nn.Module, tuned: nn.Module, *, rank: int | None = None, energy: float | None = None,
                 max_rank: int | None = None, targets=None, exclude=None, dtype: torch.dtype = torch.float32
                 ) -> Extracted:
    """The per-layer truncated SVD of ``tuned − base`` over the linear layers that differ (see the module docstring).

    ``rank``: the rank of every layer (``min(rank, d_out, d_in)``); or ``energy`` in (0, 1]: per layer the smallest
    rank keeping that share of ``‖ΔW‖_F²``, at most ``max_rank``. ``targets``/``exclude``: restrict the layers (a
    regex on the full path or a list of names/suffixes, as ``attach``'s). The SVD runs in ``dtype`` (float32;
    float64 for more accuracy). Returns an :class:`Extracted`; ``.save(dir)`` writes the PEFT file.
    """
    if (rank is None) == (energy is None):
        raise ConfigError("extract_lora needs exactly one of rank=<int> or energy=<fraction in (0, 1]>")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy must be a fraction in (0, 1], got {energy!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ConfigError(f"max_rank must be a positive integer, got {max_rank!r}")
    if targets == "all-linear":
        targets = None
    bp, tp = dict(base.named_parameters()), dict(tuned.named_parameters())
    if set(bp) != set(tp):
        diff = sorted(set(bp) ^ set(tp))
        raise ConfigError(f"the base and tuned models have different parameters (e.g. {diff[:4]}): not the same "
                          "architecture")
    for n in bp:
        if bp[n].shape != tp[n].shape:
            raise ConfigError(f"parameter '{n}' has shape {tuple(bp[n].shape)} in the base but "
                              f"{tuple(tp[n].shape)} in the tuned model")
    out = Extracted()
    covered: set[str] = set()
    lin_b, lin_t = _linears(base), _linears(tuned)
    for path, mb in lin_b.items():
        mt = lin_t.get(path)
        if mt is None or type(mt) is not type(mb):
            continue
        if targets is not None and not _spec_match(path, targets):
            continue
        if exclude is not None and _spec_match(path, exclude):
            continue
        covered.add(f"{path}.weight")
        view = LayerView(mb)
        dW = (view.matrix(mt.weight).to(dtype) - view.matrix(mb.weight).to(dtype))
        bb, bt = getattr(mb, "bias", None), getattr(mt, "bias", None)
        db = None
        if bb is not None and bt is not None:
            covered.add(f"{path}.bias")
            if not torch.equal(bb, bt):
                db = (bt.to(dtype) - bb.to(dtype)).float()
        w_same = not bool(dW.any())
        if w_same and db is None:
            continue
        if view.kind == "conv1d":
            out.fan_in_fan_out = True
        if w_same:
            k, A, B, err, kept = 1, torch.zeros(1, view.d_in), torch.zeros(view.d_out, 1), 0.0, 1.0
        else:
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            k = min(rank, S.numel()) if rank is not None else max(energy_rank(S, float(energy)), 1)
            if max_rank is not None:
                k = min(k, max_rank)
            root = S[:k].sqrt()
            B, A = U[:, :k] * root, root[:, None] * Vh[:k]
            total = float((S.double() ** 2).sum())
            kept = float((S[:k].double() ** 2).sum()) / total
            err = float((dW - B @ A).norm() / dW.norm())
            A, B = A.float(), B.float()
        out.factors[path], out.biases[path], out.ranks[path] = (A, B), db, k
        out.errors[path], out.energy[path] = err, kept
    for n in bp:
        if n not in covered and not torch.equal(bp[n], tp[n]):
            out.skipped.append(n)
    if out.skipped:
        log.warning("%d parameter(s) differ but are not linear layers a LoRA can express, so the extracted adapter "
                    "leaves them at the base values: %s", len(out.skipped), ", ".join(out.skipped[:8]) +
                    (" ..." if len(out.skipped) > 8 else ""))
    if not out.factors:
        raise ConfigError("no linear layer differs between the base and the tuned model"
                          + (f" among targets={targets!r}" if targets is not None else "") + ": nothing to extract")
    log.info("extracted a LoRA on %d layers (ranks %d..%d), mean relative error %.3g", len(out.factors),
             min(out.ranks.values()), max(out.ranks.values()), sum(out.errors.values()) / len(out.errors))
    return out


def load_pretrained(path: str | os.PathLike) -> nn.Module:
    """A transformers model from a ``save_pretrained`` directory, as the class its config names (so module paths
    are those PEFT users get from the same class), in float32 on CPU."""
    from transformers import AutoConfig

    import transformers

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p} is not a transformers model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(str(p))
    archs = getattr(cfg, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(p), dtype=torch.float32).eval()
