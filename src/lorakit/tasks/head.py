"""LS-LLaMA / LS-unLLaMA: label-supervised classification on a decoder LM (task kind ``head-classify``).

Paper: Zongxi Li, Xianming Li, Yuzhang Liu, Haoran Xie, Jing Li, Fu-lee Wang, Qing Li, Xiaoqin Zhong, "Label
Supervised LLaMA Finetuning", arXiv 2310.01208; official code https://github.com/4AI/LS-LLaMA (read, not copied).

The decoder's final hidden states ``H = LM(x) ∈ R^{T×d}`` (after the final norm) go through a linear head
``W ∈ R^{C×d}`` (no bias) at every position, ``Z = H Wᵀ ∈ R^{T×C}``, and are pooled over the sequence:

* ``last``: ``z = Z[t_last]``, the last non-padding token (what transformers' ``*ForSequenceClassification`` does);
* ``mean``: ``z = Σ_t m_t Z_t / Σ_t m_t`` (masked mean; m = attention mask);
* ``max``:  ``z_c = max_{t: m_t=1} Z_{t,c}`` (masked max, per class).

Loss: cross-entropy ``-log softmax(z)_y``. The adapter (any method, ``adapter.method``) trains on the backbone, the
head trains beside it as ``adapter.trainable: [score]`` (PEFT ``modules_to_save``, the key PEFT's ``SEQ_CLS`` uses).

LS-unLLaMA (``data.attention: bidirectional``) removes the causal mask: every token attends to every non-padding
token. In transformers 5 this is the model config's ``is_causal = False`` (``create_causal_mask`` then builds the
bidirectional mask) plus ``is_causal=False`` passed to the attention functions, because SDPA/flash fall back to
their own causal flag when the mask is skipped (no padding in the batch).

Choices where the paper/code is unclear or where we differ, and why:

* Pooling is applied to the per-token *logits*, as the official ``UnmaskingLlamaForSequenceClassification`` does
  (for ``mean`` this equals pooling the hidden states first; for ``max`` it does not).
* The official mean/max pool over padding positions too (``torch.mean(logits, dim=1)``) and its unmasked model drops
  the padding mask; we mask padding in both (a padded batch then computes what each row alone computes; tested).
* Paper defaults (code): ``r=12, lora_alpha=32, lora_dropout=0.1, lr=5e-5, 10 epochs, batch 8, max_length 64``;
  the recipe keeps r/alpha/dropout and max_length but uses a CPU-sized step budget and a higher rate
  (see docs/workflows.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import assets
from ..errors import ConfigError
from .classify import EncoderClassification

__all__ = ["HeadClassification", "pool_logits", "head_logits", "set_bidirectional", "load_decoder_classifier"]

POOLINGS = ("last", "mean", "max")


def pool_logits(z: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """``(B, T, C)`` per-token logits and a ``(B, T)`` 0/1 mask (right or left padding) to ``(B, C)``."""
    m = mask.to(torch.bool)
    if pooling == "last":
        pos = torch.arange(m.shape[1], device=m.device)
        last = torch.where(m, pos, -1).max(1).values  # the last position holding a token
        return z[torch.arange(z.shape[0], device=z.device), last]
    if pooling == "mean":
        w = m.to(z.dtype)[..., None]
        return (z * w).sum(1) / w.sum(1).clamp(min=1)
    if pooling == "max":
        return z.masked_fill(~m[..., None], torch.finfo(z.dtype).min).max(1).values
    raise ConfigError(f"data.pooling={pooling!r}; valid: {', '.join(POOLINGS)}")


def set_bidirectional(model: nn.Module, on: bool = True) -> None:
    """LS-unLLaMA: make a transformers decoder attend bidirectionally (``config.is_causal``; see the module doc)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError("data.attention=bidirectional needs a Hugging Face model (a config with is_causal)")
    cfg.is_causal = not on
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is not None and getattr(base, "config", None) is not None:
        base.config.is_causal = not on


def head_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, pooling: str = "last") -> Tensor:
    """Pooled class logits of a ``*ForSequenceClassification`` decoder (backbone ``model.model``, head
    ``model.score``), computed per token then pooled (see :func:`pool_logits`)."""
    backbone = getattr(model, model.base_model_prefix)
    kw = {}
    if getattr(model.config, "is_causal", True) is False:
        kw["is_causal"] = False  # SDPA/flash: do not fall back to the causal flag when the mask is skipped
    h = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).last_hidden_state
    return pool_logits(model.score(h), attention_mask, pooling)


def load_decoder_classifier(name: str, num_labels: int, dtype: str = "float32", pad_token_id: int | None = None):
    """``(model, tokenizer)``: a causal LM's backbone with a new ``score`` head (``AutoModelForSequenceClassification``:
    LlamaForSequenceClassification for SmolLM2), seeded by the caller."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging as hf_logging

    path = assets.model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    verb = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is the point here
    try:
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                               dtype=getattr(torch, dtype))
    finally:
        hf_logging.set_verbosity(verb)
    m.config.pad_token_id = tok.pad_token_id if pad_token_id is None else pad_token_id
    m.name_or_path = name if name in assets.MODELS else str(path)
    return m.eval(), tok


class HeadClassification(EncoderClassification):
    """A causal LM + a linear head, cross-entropy on pooled logits (LS-LLaMA; module docstring). ``data.pooling``:
    last | mean | max; ``data.attention``: causal (LS-LLaMA) | bidirectional (LS-unLLaMA)."""

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.pooling not in POOLINGS:
            raise ConfigError(f"data.pooling={self.cfg.pooling!r}; valid: {', '.join(POOLINGS)}")

    def load_model(self, name, dtype="float32"):
        model, tok = load_decoder_classifier(name, len(self.labels), dtype)
        if self.cfg.attention == "bidirectional":
            set_bidirectional(model)
        return model, tok

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return head_logits(model, batch["input_ids"], batch["attention_mask"], self.cfg.pooling)

    def forward(self, model, batch):
        z = self.logits(model, batch)
        return F.cross_entropy(z.float(), batch["labels"]), z

    def describe(self) -> dict:
        return {**super().describe(), "pooling": self.cfg.pooling, "attention": self.cfg.attention}
