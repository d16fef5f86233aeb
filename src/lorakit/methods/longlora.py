"""LongLoRA: efficient long-context fine-tuning (Chen et al. 2024, "LongLoRA: Efficient Fine-tuning of Long-Context
Large Language Models", ICLR 2024, arXiv:2309.12307; official code dvlab-research/LongLoRA).

The adapter is LoRA on the attention projections (``h = W0 x + s·BAx``; official r=8, α=16, q/k/v/o); the paper's
"LoRA+" also trains the embedding and every normalisation layer in full (recipe: ``trainable: [embed_tokens,
input_layernorm, post_attention_layernorm, norm]``, PEFT's ``modules_to_save`` matching). What LongLoRA adds is the
*training* attention, **shifted sparse attention (S²-Attn)**: with sequence length N and group size
``G = group_ratio·N`` (official 1/4),

* the first half of the heads attends causally within consecutive groups of G tokens;
* the second half is rolled by ``−G/2`` along the sequence before grouping (its groups straddle the first half's
  group borders, so information flows between groups), and its outputs are rolled back by ``+G/2``.

Attention cost per layer drops from O(N²) to O(N·G). At inference (``model.eval()``) the model's own attention runs
unchanged: the trained adapter is used with full attention (tested identical to the base attention path).

Implementation: a transformers attention function registered as ``"lorakit_s2attn"`` through
``AttentionInterface``; ``bind`` switches the model's attention implementation to it and the handle restores the
previous one on detach. In training mode it runs S²-Attn (``torch.nn.functional.scaled_dot_product_attention`` per
group); otherwise it calls the previous implementation. Decisions as the official code: the roll wraps around, so
the last group of the shifted heads holds the sequence's last G/2 and first G/2 tokens (the official behaviour); the padding mask is not applied inside
groups (train on packed sequences, as the paper does). RoPE position interpolation (``⌈target/orig⌉``) is a model
setting (``rope_scaling``), not part of the adapter; SmolLM2's native window already covers the lengths tested here.
Where we differ: the official code requires ``N`` divisible by ``G``; here a batch of any length trains (padded,
variable-length batches, as the arena's classification tasks have): the sequence is padded at its end to the next
multiple of ``G`` with keys no query attends to (each query still sees itself, so no row is empty), the shifted
heads roll the padded sequence, and the padded positions are cut from the output. With ``N`` a multiple of ``G``
nothing changes (the official computation).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import register
from ..errors import ConfigError, LorakitError
from .lora import LoRA, lora_spec

log = logging.getLogger(__name__)
S2_NAME = "lorakit_s2attn"


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def s2_attention_core(q: Tensor, k: Tensor, v: Tensor, group: int, scaling: float | None = None, shift: bool = True,
                      dropout: float = 0.0) -> Tensor:
    """S²-Attn on (B, H, N, D) tensors (k/v already repeated to H heads); returns (B, H, N, D)."""
    B, H, N, D = q.shape
    if group <= 0:
        raise LorakitError(f"longlora: the group size must be positive, got {group}")
    half = H // 2 if shift else H
    pad = (-N) % group
    if pad:  # pad the end to a multiple of G with keys nobody attends to (a query always sees itself)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    M = N + pad

    def roll(t: Tensor, by: int) -> Tensor:
        return torch.cat([t[:, :half], t[:, half:].roll(by, dims=2)], dim=1) if half < H else t

    n_g = M // group
    qs, ks, vs = (roll(t, -group // 2).reshape(B, H, n_g, group, D) for t in (q, k, v))
    if pad:
        valid = torch.arange(M, device=q.device) < N  # (M,), before the roll
        vh = valid.expand(H, M)
        vh = roll(vh[None, :, :, None], -group // 2)[0, :, :, 0].reshape(H, n_g, group)  # rolled like the keys
        causal = torch.ones(group, group, dtype=torch.bool, device=q.device).tril()
        mask = causal & (vh[:, :, None, :] | torch.eye(group, dtype=torch.bool, device=q.device))
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling, dropout_p=dropout)
    else:
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, dropout_p=dropout)
    return roll(out.reshape(B, H, M, D), group // 2)[:, :, :N]


def _s2_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    spec = module.config.__dict__.get("_lorakit_s2")
    if spec is None:
        raise LorakitError("the lorakit_s2attn attention implementation is set but no LongLoRA adapter is bound")
    if not module.training or not spec["active"]:
        return _previous(spec)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    N = query.shape[2]
    group = max(1, int(N * spec["ratio"]))
    out = s2_attention_core(query, _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), group, scaling, spec["shift"],
                            dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _previous(spec):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    prev = spec["previous"]
    if prev in (None, "eager"):
        import importlib

        mod = importlib.import_module(spec["eager_module"])
        return mod.eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[prev]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(S2_NAME, _s2_attention)


class _RestoreAttention:
    def __init__(self, config, previous):
        self.config, self.previous = config, previous

    def remove(self) -> None:
        self.config.__dict__.pop("_lorakit_s2", None)
        self.config._attn_implementation = self.previous


@register("longlora", family="long context", paper="Chen et al. 2024, LongLoRA, arXiv:2309.12307",
          peft=lora_spec({"use_dora": False, "init_lora_weights": True}, {"use_dora": lambda v: not v}))
class LongLoRA(LoRA):
    __doc__ = __doc__

    @dataclass
    class Config(LoRA.Config):
        group_ratio: float = 0.25  # G = group_ratio · N (official 1/4)
        shift: bool = True  # roll half of the heads by G/2 (False: plain grouped attention, for ablations)
        s2_attn: bool = True  # False: train with full attention (plain LoRA + trainable embed/norm)

    inits = {}
    example = {"r": 2}

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if not 0.0 < cfg.group_ratio <= 1.0:
            raise ConfigError(f"longlora: group_ratio={cfg.group_ratio} must be in (0, 1] (G = ratio · N)")

    @classmethod
    def bind(cls, att) -> list:
        model = att.model
        config = getattr(model, "config", None)
        cfg = att.method_config(None)
        eager_module = next((type(m).__module__ for m in model.modules() if hasattr(m, "num_key_value_groups")),
                            None)
        if config is None or not hasattr(config, "_attn_implementation") or eager_module is None:
            log.warning("longlora: %s is not a transformers model with grouped attention heads: S²-Attn is off and "
                        "this trains as LoRA", type(model).__name__)
            return []
        if "_lorakit_s2" in config.__dict__:
            raise ConfigError("longlora: another LongLoRA adapter already drives this model's attention; detach it")
        _register()
        prev = config._attn_implementation
        config.__dict__["_lorakit_s2"] = {"ratio": cfg.group_ratio, "shift": cfg.shift, "active": cfg.s2_attn,
                                          "previous": prev, "eager_module": eager_module}
        config._attn_implementation = S2_NAME
        return [_RestoreAttention(config, prev)]
