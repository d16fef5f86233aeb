"""BA-LoRA: Bias-Alleviating LoRA (Chang et al. 2024, arXiv:2408.04556).

Parameterisation and init: PiSSA (``h = W_res x + s·BAx``, A (r, d_in), B (d_out, r) from the top-r SVD of W0, fp32;
``niter > 0``: seeded randomised SVD). Trainable: A, B. Training adds three output regularisers
``λ1·L_cons + λ2·L_div + λ3·L_svd`` on the logits z (official ``train.py``, cyp-jlu-ai/BA-LoRA):

* NLG (``task="nlg"``, z (B, T, V)): ``L_cons = KL(p_pre ‖ p_ft)`` (``kl_div(log p_ft, p_pre, "batchmean")``, i.e.
  summed over tokens and vocabulary, divided by B), ``L_div = −mean_tokens H(p_ft)``.
* NLU (``task="nlu"``, z (B, C)): ``L_cons = MSE(z_ft/‖z_ft‖, z_pre/‖z_pre‖)``, ``L_div = Σ_{i≠j} Cov(z_ft)_{ij}² / C``.
* Both: ``L_svd = −mean_b (Σ_{i≤k} σ_i / Σ_i σ_i)`` ∈ [−1, −k/n] (n singular values).

Mechanism (generic, no trainer special case): the classmethod :meth:`output_loss` is collected by
``lorakit.output_loss(model, outputs, batch)``, which the trainer adds to the loss. The teacher ("pretrained model")
is the same model with this adapter's factors temporarily swapped for its initial ones (``A0``/``B0``, kept by PiSSA):
``W_res + s·B₀A₀ = W0``. ``lorakit.disabled`` would NOT give the pretrained model (the base is the residual). The
teacher pass runs under ``no_grad`` in eval mode (no dropout), without ``labels``; other active adapters stay on.

Decisions: (1) the official ``svd_regularization`` flattens z to (B, T·V) and then indexes ``s.size(1)`` of a 1-D
result, which fails; we take, per sample, the SVD of its (T, V) logit matrix (NLG) and, for 2-D NLU logits, the SVD
of the (B, C) batch matrix (the only matrix there), both in fp32. (2) log-softmax instead of ``probs.log()``
(same value, stable). (3) No padding mask, as the official code. PEFT files: the adapter is a PiSSA file
(``init_lora_weights="pissa"``); PEFT files load back as ``pissa`` (the regularisers are training-only).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attachments import get_attachment
from ..core import LowRankConfig, register
from ..errors import ConfigError
from .lora import lora_spec
from .pissa import PiSSA


def consistency(z: Tensor, z_pre: Tensor, task: str) -> Tensor:
    if task == "nlg":
        return F.kl_div(F.log_softmax(z, -1), F.softmax(z_pre, -1), reduction="batchmean")
    return F.mse_loss(F.normalize(z, dim=-1), F.normalize(z_pre, dim=-1))


def diversity(z: Tensor, task: str) -> Tensor:
    if task == "nlg":
        logp = F.log_softmax(z, -1)
        return (logp.exp() * logp).sum(-1).mean()  # −H
    zc = z - z.mean(0)
    cov = zc.t() @ zc / max(z.shape[0] - 1, 1)
    return (cov - torch.diag(cov.diagonal())).pow(2).sum() / z.shape[-1]


def svd_ratio_loss(z: Tensor, k: int) -> Tensor:
    """``−mean (Σ_{i≤k} σ_i / Σ σ_i)`` over per-sample (T, V) matrices, or the (B, C) matrix for 2-D logits."""
    mats = z.float() if z.dim() == 3 else z.float()[None]
    s = torch.linalg.svdvals(mats)
    k = min(k, s.shape[-1])
    return -(s[:, :k].sum(-1) / (s.sum(-1) + 1e-10)).mean()


def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "logits"):
        return outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    raise ConfigError("BA-LoRA needs model outputs with logits")


@contextlib.contextmanager
def initial_factors(model: nn.Module, name: str):
    """Temporarily run adapter ``name`` with its initial factors (the pretrained model for PiSSA-like inits)."""
    swapped = []
    try:
        for a in get_attachment(model, name).adapters:
            for p, p0 in ((a.lora_A.weight, a.A0), (a.lora_B.weight, a.B0)):
                swapped.append((p, p.data))
                p.data = p0.to(p.dtype).view_as(p)
        yield model
    finally:
        for p, d in swapped:
            p.data = d


@register("ba_lora", family="core low-rank", paper="Chang et al. 2024, BA-LoRA, arXiv:2408.04556",
          peft=lora_spec({"use_dora": False, "init_lora_weights": "pissa"},
                         {"init_lora_weights": lambda v: False}))  # PEFT files load as plain PiSSA
class BALoRA(PiSSA):
    __doc__ = __doc__
    full_logits = True  # output_loss reads every position's logits (KL, entropy, per-sample SVD)

    @dataclass
    class Config(LowRankConfig):
        alpha: float = 8.0
        niter: int = 0
        seed: int = 0
        task: Literal["nlg", "nlu"] = "nlg"  # "nlg" (token logits) | "nlu" (one logit vector per example)
        lambda1: float = 1e-4  # consistency
        lambda2: float = 3e-4  # diversity
        lambda3: float = 1e-4  # SVD
        k: int = 3

    def __init__(self, base, cfg: Config, view=None):
        if cfg.task not in ("nlg", "nlu"):
            raise ConfigError(f"BA-LoRA task must be 'nlg' or 'nlu', got {cfg.task!r}")
        super().__init__(base, cfg, view)

    @classmethod
    def output_loss(cls, att, outputs: Any, batch: Any) -> Tensor | None:
        model, name = att.model, att.name
        cfg = att.method_config()
        z = _logits(outputs).float()
        total = z.new_zeros(())
        if cfg.lambda1:
            total = total + cfg.lambda1 * consistency(z, cls.teacher_logits(model, name, batch), cfg.task)
        if cfg.lambda2:
            total = total + cfg.lambda2 * diversity(z, cfg.task)
        if cfg.lambda3:
            total = total + cfg.lambda3 * svd_ratio_loss(z, cfg.k)
        return total

    @staticmethod
    @torch.no_grad()
    def teacher_logits(model: nn.Module, name: str, batch: Any) -> Tensor:
        from ..inject import _call

        if isinstance(batch, dict):
            batch = {k: v for k, v in batch.items() if k != "labels"}
        was = model.training
        model.eval()
        try:
            with initial_factors(model, name):
                return _logits(_call(model, batch)).float()
        finally:
            model.train(was)
