"""Temp-Lora: inference-time training of a temporary adapter for long-text generation.

Paper: Y. Wang, D. Ma, D. Cai, "With Greater Text Comes Greater Necessity: Inference-Time Training Helps Long
Text Generation", arXiv 2401.11504; official code https://github.com/TemporaryLoRA/Temp-LoRA (read, not copied).

The text is processed in chunks of Δ = ``chunk`` tokens. For chunk ``c_i = x[s_i : s_i+Δ]``:

1. generate (``generate``) or score (``perplexity``) it with the current temporary adapter θ_i and a *short*
   context: only the ``window`` tokens before ``s_i`` are visible, ``p(c_i | x[s_i-window : s_i]; W0 + ΔW(θ_i))``;
2. train the adapter on it: ``epochs`` optimiser steps on
   ``L(θ) = -Σ_{t ∈ c_i} log p(x_t | x[s_i-train_window : t]; W0 + ΔW(θ))`` (loss on the chunk only, the context
   labelled -100), so what falls out of the window lives on in θ;
3. after the last chunk the adapter is detached: the base model is bit-exactly what it was.

One adapter and one optimiser live across the chunks (the official trainer's ``train_once`` on the same PEFT model);
the LR schedule is ``constant_with_warmup`` stepped once per chunk, as there (``lr·min(1, i/warmup)``: the first
chunk trains at rate 0 when ``warmup`` > 0, exactly as transformers' schedule does).
The adapter is any lorakit method (``adapter``) and the optimiser any procedure (``optim``), as in ``lorakit train``.

Defaults are the official README's: LoRA r=64, alpha=64, dropout 0.05 on every linear layer, lr 5e-5, AdamW,
constant_with_warmup with 2 warmup steps, 2 epochs per chunk, Δ=1024, training and evaluation windows 3072 tokens
(LLaMA-2-7B-32K). For SmolLM2-135M on a CPU, ``recipes/workflows/temp-lora.yaml`` uses smaller windows and a
higher rate (docs/workflows.md).

Choices where the paper/code is unclear, and why:

* The first chunk starts at token 0 with no context (the official PG19 loader uses a first window of 1024 tokens;
  here it is ``chunk``, so every chunk has the same size).
* ``perplexity`` reports ``exp(Σ NLL / Σ tokens)`` over all scored tokens (the standard definition) for the base
  model with the same window (adapter disabled) and for Temp-Lora in the same pass; the official script reports a
  token-weighted mean of per-chunk perplexities (``mean_base_ppl``), which we also return (``chunk_mean_ppl``).
* Generation is chunked with a fresh ``generate`` call per chunk over the last ``window`` tokens (the cache is not
  reused across chunks: the adapter changed), greedy unless ``do_sample``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from .. import inject
from ..config import AttachConfig, from_dict
from ..errors import ConfigError
from ._stepper import Stepper

__all__ = ["TempLoraConfig", "generate", "perplexity", "state_hash", "make_config"]


@dataclass
class TempLoraConfig:
    chunk: int = 1024  # Δ: tokens generated / scored between two trainings (official stride_size)
    window: int = 3072  # context tokens visible before a chunk when generating or scoring (eval_input_length)
    train_window: int | None = None  # context tokens before a chunk in its training sample (None: window)
    epochs: int = 2  # optimiser steps per chunk (num_train_epochs over the one-sample chunk)
    lr: float = 5e-5  # 0: the adapter never changes (the invariant: output = base with the same window)
    weight_decay: float = 0.0
    warmup: int = 2  # constant_with_warmup, in chunks
    max_grad_norm: float | None = None  # the official trainer does not clip
    optim: str = "adamw"  # a training procedure (lorakit procedures)
    options: dict[str, Any] = field(default_factory=dict)  # the procedure's own options
    adapter: dict[str, Any] = field(default_factory=lambda: {"method": "lora", "targets": "all-linear", "r": 64,
                                                             "alpha": 64, "dropout": 0.05})
    name: str = "temp_lora"  # the attach name (removed afterwards)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> None:
        for k in ("chunk", "window", "epochs"):
            if getattr(self, k) < 1:
                raise ConfigError(f"temp_lora.{k}={getattr(self, k)} must be >= 1")
        if self.train_window is not None and self.train_window < 0:
            raise ConfigError(f"temp_lora.train_window={self.train_window} must be >= 0")
        if self.warmup < 0 or self.lr < 0 or self.weight_decay < 0:
            raise ConfigError("temp_lora.lr, weight_decay and warmup must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"temp_lora.max_grad_norm={self.max_grad_norm} must be > 0")
        AttachConfig.make(dict(self.adapter))  # method and options validated now, before any model loads
        from ..procedures import make_procedure

        make_procedure(self.optim, self.options, where="temp_lora.options")


def make_config(config: TempLoraConfig | dict | None = None) -> TempLoraConfig:
    if isinstance(config, TempLoraConfig):
        config.validate()
        return config
    return from_dict(TempLoraConfig, config or {}, where="temp_lora")


def state_hash(model: nn.Module) -> str:
    """SHA-256 over every tensor of ``model.state_dict()`` (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Session:
    """The temporary adapter, its optimiser and the per-chunk training sample; detached by ``close``."""

    def __init__(self, model: nn.Module, cfg: TempLoraConfig, n_chunks: int, train: bool):
        self.model, self.cfg, self.train = model, cfg, train
        self.device = next(model.parameters()).device
        self.stepper = None
        if not train:
            return
        if cfg.name in inject.attached(model):
            raise ConfigError(f"the model already has an adapter named '{cfg.name}'; choose another temp_lora.name")
        torch.manual_seed(cfg.seed)
        inject.attach(model, dict(cfg.adapter), name=cfg.name)
        try:
            w = cfg.warmup
            self.stepper = Stepper(model, optim=cfg.optim, options=cfg.options, lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, total_steps=n_chunks, max_grad_norm=cfg.max_grad_norm,
                                   lr_fn=(lambda i: min(1.0, i / w)) if w else (lambda i: 1.0))
        except BaseException:
            inject.detach(model, cfg.name)
            raise

    def autocast(self):
        import contextlib

        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def learn(self, ids: list[int], start: int, end: int) -> float | None:
        """Train on chunk ``ids[start:end]`` with ``train_window`` tokens of context (loss on the chunk)."""
        if self.stepper is None:
            return None
        tw = self.cfg.window if self.cfg.train_window is None else self.cfg.train_window
        lo = max(0, start - tw)
        x = torch.tensor([ids[lo:end]], device=self.device)
        labels = x.clone()
        labels[:, :start - lo] = -100
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}

        def fwd():
            with self.autocast():
                out = self.model(**batch)
            return out.loss, out

        losses = [self.stepper.step(fwd, batch, schedule=False) for _ in range(self.cfg.epochs)]
        self.stepper.schedule_step()
        return losses[-1]

    def close(self) -> None:
        if self.train and self.cfg.name in inject.attached(self.model):
            inject.detach(self.model, self.cfg.name)


def _nll(model: nn.Module, ids: list[int], start: int, end: int, window: int, device) -> tuple[float, int]:
    """Summed NLL of ``ids[start:end]`` given the ``window`` tokens before ``start`` (the first token of the text has
    no prediction), and the number of tokens scored."""
    lo = max(0, start - window)
    x = torch.tensor([ids[lo:end]], device=device)
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float()
    tgt = x[0, 1:]
    first = max(start - lo - 1, 0)  # the logit row predicting ids[start] (or ids[1] when start = 0)
    lp = logits[first:].log_softmax(-1).gather(-1, tgt[first:, None])[:, 0]
    return float(-lp.sum()), int(lp.numel())


@torch.no_grad()
def _score(model, ids, start, end, window, device):
    was = model.training
    model.eval()
    try:
        return _nll(model, ids, start, end, window, device)
    finally:
        model.train(was)


def perplexity(model: nn.Module, tok, text: str | list[int], config: TempLoraConfig | dict | None = None, *,
               max_tokens: int | None = None, baseline: bool = True,
               on_chunk: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Perplexity of ``text`` scored chunk by chunk with a ``window``-token context, training the temporary adapter
    on each chunk after scoring it (the official PG19 protocol). ``baseline``: also score every chunk with the
    adapter disabled (the same short window without Temp-Lora) in the same pass. The adapter is removed at the end.

    Returns ``{"ppl", "base_ppl", "chunk_mean_ppl", "base_chunk_mean_ppl", "tokens", "chunks", "per_chunk"}``."""
    cfg = make_config(config)
    ids = list(text) if isinstance(text, list) else tok(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ConfigError("perplexity needs a text of at least 2 tokens")
    bounds = [(s, min(s + cfg.chunk, len(ids))) for s in range(0, len(ids), cfg.chunk)]
    device = next(model.parameters()).device
    sess = _Session(model, cfg, len(bounds), train=True)
    tot = {"lora": 0.0, "base": 0.0}
    wppl = {"lora": 0.0, "base": 0.0}
    n_tok, per = 0, []
    try:
        for i, (s, e) in enumerate(bounds):
            nll, n = _score(model, ids, s, e, cfg.window, device)
            rec = {"chunk": i, "start": s, "end": e, "tokens": n, "nll": nll}
            tot["lora"] += nll
            wppl["lora"] += math.exp(nll / n) * n
            if baseline:
                with inject.disabled(model):
                    bnll, _ = _score(model, ids, s, e, cfg.window, device)
                rec["base_nll"] = bnll
                tot["base"] += bnll
                wppl["base"] += math.exp(bnll / n) * n
            n_tok += n
            if i < len(bounds) - 1:  # the last chunk's training would never be used
                rec["train_loss"] = sess.learn(ids, s, e)
            per.append(rec)
            if on_chunk:
                on_chunk(rec)
    finally:
        sess.close()
    out = {"ppl": math.exp(tot["lora"] / n_tok), "chunk_mean_ppl": wppl["lora"] / n_tok, "tokens": n_tok,
           "chunks": len(bounds), "per_chunk": per}
    if baseline:
        out.update(base_ppl=math.exp(tot["base"] / n_tok), base_chunk_mean_ppl=wppl["base"] / n_tok)
    return out


def generate(model: nn.Module, tok, prompt: str | list[int], max_new_tokens: int,
             config: TempLoraConfig | dict | None = None, *, train: bool = True, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0,
             on_chunk: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Generate ``max_new_tokens`` after ``prompt`` in chunks of ``chunk`` tokens, each from the last ``window``
    tokens only, training the temporary adapter on every chunk before the next (``train=False``: the same windowed
    generation without Temp-Lora). The adapter is removed at the end. Returns ``{"text", "ids", "chunks",
    "train_losses"}`` (``ids``: the new tokens)."""
    cfg = make_config(config)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    ids = list(prompt) if isinstance(prompt, list) else tok(prompt)["input_ids"]
    if not ids:
        raise ConfigError("the prompt is empty")
    n_prompt = len(ids)
    device = next(model.parameters()).device
    n_chunks = math.ceil(max_new_tokens / cfg.chunk)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    sess = _Session(model, cfg, n_chunks, train=train)
    losses: list[float] = []
    k = 0
    if do_sample:
        torch.manual_seed(cfg.seed)
    try:
        while len(ids) - n_prompt < max_new_tokens:
            n = min(cfg.chunk, max_new_tokens - (len(ids) - n_prompt))
            ctx = torch.tensor([ids[-cfg.window:]], device=device)
            kw = dict(do_sample=do_sample, temperature=temperature, top_p=top_p) if do_sample else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            was = model.training
            model.eval()
            with torch.no_grad():
                out = model.generate(input_ids=ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=n,
                                     pad_token_id=pad, **kw)
            model.train(was)
            new = out[0, ctx.shape[1]:].tolist()
            stop = eos is not None and eos in new
            if stop:
                new = new[:new.index(eos) + 1]
            start = len(ids)
            ids += new
            rec = {"chunk": k, "start": start - n_prompt, "end": len(ids) - n_prompt}
            if not stop and len(ids) - n_prompt < max_new_tokens and new:
                loss = sess.learn(ids, start, len(ids))
                if loss is not None:
                    losses.append(loss)
                    rec["train_loss"] = loss
            k += 1
            if on_chunk:
                on_chunk(rec)
            if stop or not new:
                break
    finally:
        sess.close()
    gen = ids[n_prompt:]
    return {"text": tok.decode(gen, skip_special_tokens=True), "ids": gen, "chunks": n_chunks,
            "train_losses": losses}
