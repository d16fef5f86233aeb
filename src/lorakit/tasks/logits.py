"""Logits only where a loss or a metric reads them.

A causal LM's forward ends in the output head: ``(batch, seq, d) -> (batch, seq, vocab)``. The tasks read few of
those rows: the generative classifier one position per row (the answer position) or the label word's tokens, SFT
and DPO the completion tokens. On SmolLM2 (vocab 49,152) the head and its ``log_softmax`` over every position were
a fifth of a training step's FLOPs and the largest tensors of the step (8 rows x 128 tokens x 49,152 x 4 bytes =
200 MB per copy, several copies with the gradient).

:func:`head_hidden` runs the model with a forward pre-hook on its output head that records the head's input (the
last hidden state, after the final norm) and hands the head an empty slice instead, so the model computes no
logits. :func:`token_logprobs` then applies the head to the selected positions only, ``chunk`` rows at a time;
with gradients each chunk runs under activation checkpointing, so at most one chunk's ``(rows, vocab)`` logits
exist at once in the forward and in the backward (the head is recomputed for the selected rows: a small cost,
since they are a fraction of all positions).

Same values as the full path: the log-probabilities are ``−cross_entropy(head(h).float(), target)`` per token,
which is what transformers' causal-LM loss computes on every position before masking; only the rows of the head's
GEMM that nobody reads are skipped (the remaining rows can round differently in the last bit, since the GEMM's
blocking depends on the row count).

When the fast path does not apply, :func:`fast_head` returns None and the tasks run the full forward as before:

* an active method declares ``Adapter.full_logits`` (its ``output_loss`` reads every position's logits, e.g.
  BA-LoRA, or it hooks the head's input, X-LoRA);
* the model has no ``get_output_embeddings()`` head, or its config post-processes the logits after the head
  (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``: Gemma 2/3, Cohere, Granite), which this path
  would not reproduce;
* an adapter is attached to the output head itself (a per-position input layout or per-position context, such as a
  router reading ``attention_mask``, would no longer line up with the selected rows).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["fast_head", "head_hidden", "token_logprobs", "labelled_positions", "labelled_logprobs", "row_sums",
           "CHUNK_ELEMENTS"]

# logits elements per chunk (fp32: 64 MiB); SmolLM2's vocabulary gives 341 rows per chunk
CHUNK_ELEMENTS = 1 << 24
_POSTPROCESS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fast_head(model: nn.Module) -> nn.Module | None:
    """The output head to apply to selected positions, or None where the full forward must run (see module doc)."""
    from ..core import Adapted
    from ..inject import needs_full_logits

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or isinstance(head, Adapted) or needs_full_logits(model):
        return None
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(c, k, None) not in (None, 0, 0.0, 1, 1.0) for c in (cfg, text) for k in _POSTPROCESS):
        return None
    return head


@contextlib.contextmanager
def _capture(head: nn.Module, store: list):
    def pre(_mod, args):
        h = args[0]
        store.append(h)
        return (h[..., :0, :],) + tuple(args[1:])  # the head computes nothing

    handle = head.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def head_hidden(model: nn.Module, head: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, Any]:
    """``(h, outputs)``: the head's input ``(batch, seq, d)`` of one forward of ``model(**inputs)`` (no labels)
    and the model's outputs (their logits are empty)."""
    store: list[Tensor] = []
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    kw.setdefault("use_cache", False)  # no KV cache for a scoring pass (138 MB at 50 x 60 tokens on SmolLM2)
    with _capture(head, store):
        out = model(**kw)
    if len(store) != 1:
        raise RuntimeError(f"the output head ran {len(store)} times in one forward; expected once")
    return store[0], out


def _chunk_logp(head: nn.Module, h: Tensor, t: Tensor) -> Tensor:
    return -F.cross_entropy(head(h).float(), t, reduction="none")


def token_logprobs(head: nn.Module, h: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """``log p(targets[i] | h[i])`` for rows ``h (n, d)``: the head applied ``chunk`` rows at a time (checkpointed
    under autograd), log-softmax in fp32."""
    n = h.shape[0]
    if n == 0:
        return h.new_zeros(0, dtype=torch.float32)
    vocab = _out_features(head)
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if n <= chunk:
        return _chunk_logp(head, h, targets)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for i in range(0, n, chunk):
        hi, ti = h[i:i + chunk], targets[i:i + chunk]
        parts.append(checkpoint(_chunk_logp, head, hi, ti, use_reentrant=False) if grad
                     else _chunk_logp(head, hi, ti))
    return torch.cat(parts)


def _out_features(head: nn.Module) -> int:
    n = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
    if n is None:
        w = getattr(head, "weight", None)
        n = w.shape[0] if w is not None else 1
    return int(n)


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, targets)`` of the next-token targets of ``labels (batch, seq)`` (-100: not a target): the
    hidden state at ``(row, col)`` predicts ``targets = labels[row, col + 1]``."""
    tgt = labels[:, 1:]
    rows, cols = (tgt != -100).nonzero(as_tuple=True)
    return rows, cols, tgt[rows, cols]


def labelled_logprobs(model: nn.Module, head: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Any]:
    """``(logp, rows, outputs)``: one forward of ``model`` on ``batch`` and the log-probability of every labelled
    next token (``batch["labels"]``, -100 elsewhere), ``rows`` the batch row of each."""
    h, out = head_hidden(model, head, batch)
    rows, cols, tgt = labelled_positions(batch["labels"])
    return token_logprobs(head, h[rows, cols], tgt), rows, out


def row_sums(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """Per-row sums of per-token ``values`` (rows without a token: 0)."""
    return values.new_zeros(n).index_add(0, rows, values)
