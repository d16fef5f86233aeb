"""Classification: a causal LM as a generative classifier (label words), or an encoder with a trained head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import assets
from ..errors import ConfigError
from .base import Task, classification_metrics, pad, to_device
from .logits import fast_head, head_hidden, labelled_logprobs, row_sums


def _fit(prompt_ids: list[int], tail_ids: list[int], budget: int) -> list[int]:
    """Keep the head of the prompt and its fixed tail (the question to the model) within ``budget`` tokens."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    keep = max(budget - len(tail_ids), 1)
    return prompt_ids[:keep] + tail_ids[-(budget - keep):] if budget > keep else prompt_ids[:budget]


class LMClassification(Task):
    """Generative classifier: ``prompt(text) + label_word``; the loss is the label word's NLL, the prediction the
    label whose word is most likely (summed token log-probabilities)."""
    prompt_fields = ("text",)

    def load_model(self, name, dtype="float32", cache=True):
        return assets.load_causal_lm(name, dtype, cache)

    def _setup(self, tok):
        words = list(self.cfg.label_words or self.spec.label_words or [" " + lab for lab in self.labels])
        if len(words) != len(self.labels):
            raise ConfigError(f"data.label_words has {len(words)} entries but there are {len(self.labels)} labels "
                              f"{self.labels}")
        self.word_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
        if any(not w for w in self.word_ids) or len({tuple(w) for w in self.word_ids}) != len(words):
            raise ConfigError(f"label words {words} must tokenize to distinct, non-empty token sequences")
        self.single = all(len(w) == 1 for w in self.word_ids)
        self.template = self.cfg.prompt or self.spec.prompt or "{text}\nLabel:"
        if "{text}" not in self.template:
            raise ConfigError(f"data.prompt {self.template!r} must contain {{text}}")
        self.tail_ids = tok(self.template.split("{text}", 1)[1], add_special_tokens=False)["input_ids"]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def encode(self, rows, tok):
        self._setup(tok)
        budget = self.cfg.max_length - max(len(w) for w in self.word_ids)
        out = []
        for r in rows:
            p = _fit(tok(self.template.format(text=r["text"]))["input_ids"], self.tail_ids, budget)
            y = self.labels.index(r["label"])
            w = self.word_ids[y]
            out.append({"prompt": p, "y": y, "input_ids": p + w, "labels": [-100] * len(p) + w})
        return out

    def collate(self, examples):
        ids = pad([e["input_ids"] for e in examples], self.pad_id)
        mask = pad([[1] * len(e["input_ids"]) for e in examples], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad([e["labels"] for e in examples], -100)}

    def forward(self, model, batch):
        """The label word's mean token NLL (transformers' causal-LM loss), computing logits only at the label
        word's positions where nothing needs the full outputs (:mod:`lorakit.tasks.logits`)."""
        head = fast_head(model)
        if head is None:
            return super().forward(model, batch)
        lp, _, out = labelled_logprobs(model, head, batch)
        return -lp.mean(), out

    @torch.no_grad()
    def _scores(self, model: nn.Module, chunk: list[dict], device) -> Tensor:
        """(n, n_labels) log-likelihood of each label word after each prompt."""
        head = fast_head(model)
        if self.single:
            ids = pad([e["prompt"] for e in chunk], self.pad_id).to(device)
            mask = pad([[1] * len(e["prompt"]) for e in chunk], 0).to(device)
            if head is not None:  # the head at the answer position only
                h, _ = head_hidden(model, head, {"input_ids": ids, "attention_mask": mask})
                last = head(h[torch.arange(len(chunk), device=device), mask.sum(1) - 1]).float().log_softmax(-1)
                return last[:, [w[0] for w in self.word_ids]].cpu()
            logits = model(input_ids=ids, attention_mask=mask).logits
            last = logits[torch.arange(len(chunk), device=device), mask.sum(1) - 1].float().log_softmax(-1)
            return last[:, [w[0] for w in self.word_ids]].cpu()
        cols = []
        for w in self.word_ids:
            seqs = [e["prompt"] + w for e in chunk]
            labs = [[-100] * len(e["prompt"]) + w for e in chunk]
            ids, lab = pad(seqs, self.pad_id).to(device), pad(labs, -100).to(device)
            mask = pad([[1] * len(s) for s in seqs], 0).to(device)
            if head is not None:
                lp, rows, _ = labelled_logprobs(model, head, {"input_ids": ids, "attention_mask": mask, "labels": lab})
                cols.append(row_sums(lp, rows, len(chunk)).cpu())
                continue
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = lab[:, 1:]
            lp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
            cols.append(lp.sum(1).cpu())
        return torch.stack(cols, 1)

    @torch.no_grad()
    def predict_scores(self, model: nn.Module, examples: list[dict], batch_size: int = 32) -> Tensor:
        """``(n, n_labels)`` class scores of encoded examples (their labels unused): the label words'
        log-likelihoods. Every classification task has it (a teacher's labels, Trans-LoRA)."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            return torch.cat([self._scores(model, examples[i:i + batch_size], device)
                              for i in range(0, len(examples), batch_size)])
        finally:
            model.train(was)

    def evaluate(self, model, tok, examples, batch_size=32):
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        ys, preds, nll = [], [], 0.0
        try:
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                s = self._scores(model, chunk, device)
                for e, row in zip(chunk, s):
                    ys.append(e["y"])
                    preds.append(int(row.argmax()))
                    nll -= float(row[e["y"]])
        finally:
            model.train(was)
        m = classification_metrics(ys, preds, len(self.labels))
        m["loss"] = nll / max(len(ys), 1)
        return m


class EncoderClassification(Task):
    """Encoder + classification head; the head is trained as ``AttachConfig.trainable`` (PEFT modules_to_save)."""

    auto_class = "AutoModelForSequenceClassification"

    def load_model(self, name, dtype="float32"):
        return assets.load_encoder_classifier(name, num_labels=len(self.labels), dtype=dtype)

    def adapter_defaults(self, model: nn.Module) -> dict:
        heads = [n for n in ("classifier", "score") if hasattr(model, n)]
        return {"trainable": heads[:1]}

    def encode(self, rows, tok):
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        enc = tok([r["text"] for r in rows], truncation=True, max_length=self.cfg.max_length)["input_ids"]
        return [{"input_ids": ids, "y": self.labels.index(r["label"])} for ids, r in zip(enc, rows)]

    def collate(self, examples):
        return {"input_ids": pad([e["input_ids"] for e in examples], self.pad_id),
                "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
                "labels": torch.tensor([e["y"] for e in examples], dtype=torch.long)}

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @torch.no_grad()
    def predict_scores(self, model: nn.Module, examples: list[dict], batch_size: int = 32) -> Tensor:
        """``(n, n_labels)`` class logits of encoded examples (their labels unused)."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            return torch.cat([self.logits(model, to_device(self.collate(examples[i:i + batch_size]), device))
                              .float().cpu() for i in range(0, len(examples), batch_size)])
        finally:
            model.train(was)

    @torch.no_grad()
    def evaluate(self, model, tok, examples, batch_size=32):
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        ys, preds, nll = [], [], 0.0
        try:
            for i in range(0, len(examples), batch_size):
                b = to_device(self.collate(examples[i:i + batch_size]), device)
                logits = self.logits(model, b).float()  # subclasses (HeadClassification) pool their own way
                nll += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                ys += b["labels"].tolist()
                preds += logits.argmax(-1).tolist()
        finally:
            model.train(was)
        m = classification_metrics(ys, preds, len(self.labels))
        m["loss"] = nll / max(len(ys), 1) if ys else math.nan
        return m
