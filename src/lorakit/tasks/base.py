"""What every task shares: rows (named dataset or your file), label checks, padding, metrics."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from .. import assets
from ..errors import ConfigError

log = logging.getLogger(__name__)


def classification_metrics(y_true: list[int], y_pred: list[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (F1 averaged over the labels present in ``y_true`` or ``y_pred``, as sklearn)."""
    if not y_true:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    acc = sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)
    f1s = []
    for c in sorted(set(y_true) | set(y_pred)):
        tp = sum(1 for a, b in zip(y_true, y_pred) if a == c and b == c)
        fp = sum(1 for a, b in zip(y_true, y_pred) if a != c and b == c)
        fn = sum(1 for a, b in zip(y_true, y_pred) if a == c and b != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s)}


def pad(seqs: list[list[int]], value: int) -> Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long)


class Task:
    """Base class. Subclasses set ``columns`` and implement ``load_model``, ``encode``, ``collate``, ``evaluate``."""

    columns: tuple[str, ...] = ("text", "label")
    raw_columns: tuple[str, ...] = ()  # columns of a user file kept as read (not turned into strings)
    is_classification = True
    # per-batch context this task's batches carry (popped by the trainer into ``lorakit.batch_context``)
    context_keys: tuple[str, ...] = ()
    # the placeholders ``data.prompt`` may use; the first is required (empty: this task has no prompt template)
    prompt_fields: tuple[str, ...] = ()

    def __init__(self, spec, data_cfg=None):
        if data_cfg is None:
            from ..train.config import DataSection

            data_cfg = DataSection(task=spec.name)
        self.spec, self.cfg = spec, data_cfg
        self.labels: list[str] = []

    @property
    def name(self) -> str:
        return self.spec.name

    def model_name(self, override: str | None) -> str:
        name = override or self.spec.model
        if not name:
            raise ConfigError(f"task '{self.name}' has no default model: set model.name (a lorakit model such as "
                              f"{', '.join(assets.MODELS)} or a local Hugging Face model directory)")
        return name

    def prompt_template(self) -> str:
        """The ``{prompt}`` template of a prompt/completion task (data.prompt, else the task's own)."""
        template = self.cfg.prompt or self.spec.prompt or "{prompt}"
        if "{prompt}" not in template:
            raise ConfigError(f"data.prompt {template!r} must contain {{prompt}}")
        return template

    def check_config(self) -> None:
        """What can be checked before any model or dataset loads (``lorakit.train.resolve`` calls it): the
        ``data.prompt`` template's placeholders, and your data files (read once: not UTF-8, bad JSON, missing
        columns all fail here, naming the line)."""
        from ..train.config import check_template

        c = self.cfg
        if c.prompt is not None:
            if not self.prompt_fields:
                raise ConfigError(f"data.prompt is set but task '{self.name}' ({type(self).__name__}) uses no prompt "
                                  "template; remove it")
            check_template(c.prompt, "data.prompt", self.prompt_fields, required=self.prompt_fields[0])
        for key in ("path", "eval_path"):
            if getattr(c, key, None):
                assets.load_user_data(getattr(c, key), self.columns)

    # ---- rows ---------------------------------------------------------------------------------------------
    def rows(self) -> dict[str, list[dict]]:
        """``{"train": [...], "eval": [...]}`` after the size caps; labels checked against the label set."""
        c = self.cfg
        if c.path:
            train = assets.load_user_data(c.path, self.columns, raw=self.raw_columns)
            if c.eval_path:
                ev = assets.load_user_data(c.eval_path, self.columns, raw=self.raw_columns)
            else:
                sp = assets.split_rows(train, fractions=(0.9, 0.1), seed=assets.SPLIT_SEED)
                train, ev = sp["train"], sp["validation"] + sp["test"]
        elif self.spec.dataset:
            splits = assets.load_dataset(self.spec.dataset)
            train, ev = splits["train"], splits[c.eval_split]
        else:
            raise ConfigError(f"task '{self.name}' reads your data: set data.path to a JSONL or CSV file with "
                              f"columns {list(self.columns)}")
        if c.train_size is not None:
            train = train[:c.train_size]
        if c.eval_size is not None:
            ev = ev[:c.eval_size]
        if not train:
            raise ConfigError(f"task '{self.name}': the training set is empty")
        if not ev:
            raise ConfigError(f"task '{self.name}': the evaluation set is empty (set data.eval_path or use more rows)")
        if self.is_classification:
            self.labels = self._label_set(train)
            for split, rows in (("train", train), ("eval", ev)):
                for i, r in enumerate(rows):
                    if r["label"] not in self.labels:
                        raise ConfigError(f"{split} row {i + 1}: label {r['label']!r} is not in the label set "
                                          f"{self.labels} (set data.labels to declare them)")
        return {"train": train, "eval": ev}

    def _label_set(self, train: list[dict]) -> list[str]:
        if self.cfg.labels:
            return list(self.cfg.labels)
        if self.spec.dataset and not self.cfg.path:
            return list(assets.DATASETS[self.spec.dataset].labels)
        labels = sorted({r["label"] for r in train})
        if len(labels) < 2:
            raise ConfigError(f"classification needs at least 2 labels; the training data has only {labels}")
        return labels

    # ---- interface ----------------------------------------------------------------------------------------
    def load_model(self, name: str, dtype: str = "float32", cache: bool = True) -> tuple[nn.Module, Any]:
        """``(model, tokenizer)``. ``cache=False``: keep no process-wide copy (the trainer's one-off load)."""
        raise NotImplementedError

    def load_quantized(self, name: str, dtype: str = "float32", exclude=None) -> tuple[nn.Module, Any] | None:
        """The model with its linear layers quantised (NF4) as they are read, so the float model never exists
        whole (``model.quantize: nf4``), or None: the trainer then loads in float and calls ``quantize_model``.
        Causal-LM tasks read their checkpoint tensor by tensor; others return None."""
        if self.auto_class != "AutoModelForCausalLM":
            return None
        return assets.load_causal_lm_quantized(self.model_name(name), dtype, exclude)

    def encode(self, rows: list[dict], tok) -> list[dict]:
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return self.forward(model, batch)[0]

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """``(task loss, model outputs)``: the trainer hands the outputs to ``lorakit.output_loss``."""
        out = model(**batch)
        return out.loss, out

    auto_class = "AutoModelForCausalLM"

    def meta_model(self, name: str | None = None) -> nn.Module:
        """The task's model built on the meta device (shapes only: no weights read, no memory): for budget probes."""
        import transformers

        path = assets.model_path(self.model_name(name))
        cfg = transformers.AutoConfig.from_pretrained(path)
        if self.is_classification and self.auto_class != "AutoModelForCausalLM":
            labels = self.labels or (list(assets.DATASETS[self.spec.dataset].labels) if self.spec.dataset else [])
            cfg.num_labels = max(len(labels), 2)
        with torch.device("meta"):
            return getattr(transformers, self.auto_class).from_config(cfg)

    def evaluate(self, model: nn.Module, tok, examples: list[dict], batch_size: int = 32) -> dict[str, float]:
        raise NotImplementedError

    def step_metrics(self) -> dict[str, float]:
        """Task statistics of the training forwards since the last call (DPO's rewards), logged with each step."""
        return {}

    def describe(self) -> dict:
        return {"task": self.name, "kind": self.spec.kind, "labels": self.labels}


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
