"""Multi-task: one causal LM over a mixture of generative tasks, every example tagged with its task index.

The parts are ordinary tasks (:class:`~.classify.LMClassification`, :class:`~.sft.SFT`): each reads, caps
(``data.train_size``/``data.eval_size`` apply *per part*), encodes and evaluates its own rows. This class only

* tags rows with ``task_ids`` (:func:`lorakit.multitask.make_multitask`) and collates them into the batch, where
  the trainer turns them into ``lorakit.batch_context(model, task_ids=...)`` for task-routed methods;
* samples *balanced* batches (:meth:`batch_indices`): batch slots cycle through the tasks, each task draws from
  its own seeded, epoch-wise reshuffled order, so every batch mixes the tasks in equal shares (small tasks repeat
  sooner) and the order stays a pure function of (seed, step);
* weighs every example equally in the loss (mean over examples of the token-mean completion NLL), so the long
  GSM8K answers do not drown the one-token label words;
* evaluates each part on its own rows with the model routed to that task (the batch context follows every forward
  call, ``generate`` included) and logs ``<part>/<metric>`` plus ``mean_accuracy`` (mean of the classification
  parts' accuracies: the arena's primary score) and ``loss`` (mean of the parts' losses).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from .. import inject
from ..errors import ConfigError, LorakitError
from ..multitask import make_multitask
from .base import Task
from .classify import LMClassification
from .sft import SFT

__all__ = ["MultiTask", "routed"]

_PART_KINDS = {"lm-classify": LMClassification, "sft": SFT}
_SHARED_ONLY = ("path", "eval_path", "labels", "label_words", "prompt")  # per-part settings: not for the mixture


@contextlib.contextmanager
def routed(model, task: int):
    """Every forward of ``model`` in this block runs with ``task_ids`` = ``task`` for each row of its input."""
    stack: list = []

    def pre(_m, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds", args[0] if args else None)
        ids = torch.full((x.shape[0],), task, dtype=torch.long, device=x.device)
        cm = inject.batch_context(model, task_ids=ids)
        cm.__enter__()
        stack.append(cm)

    def post(_m, _args, _kwargs, _out):
        if stack:
            stack.pop().__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
             model.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        while stack:
            stack.pop().__exit__(None, None, None)


class MultiTask(Task):
    """A mixture of generative tasks on one causal LM (``spec.parts``: ``(key, TaskSpec)`` pairs)."""

    is_classification = False
    # task_ids: the part's position (task-routed mixtures); task_types: LoRAMoE's sample type per part (1 = world
    # knowledge, 0 = downstream task; TaskSpec.sample_type, 0 for every part of the built-in set)
    context_keys = ("task_ids", "task_types")

    def __init__(self, spec, data_cfg=None):
        super().__init__(spec, data_cfg)
        if not spec.parts:
            raise ConfigError(f"multi-task '{self.name}' has no parts")
        bad = [k for k in _SHARED_ONLY if getattr(self.cfg, k)]
        if bad:
            raise ConfigError(f"task '{self.name}' mixes named datasets with their own prompts and labels; "
                              f"data.{bad[0]} is not supported (train a single task to use your own data)")
        self.keys = [k for k, _ in spec.parts]
        self.parts: list[Task] = []
        for key, p in spec.parts:
            if p.kind not in _PART_KINDS:
                raise ConfigError(f"task '{self.name}': part '{key}' is of kind '{p.kind}'; a multi-task mixture "
                                  f"shares one causal LM, so parts must be {' or '.join(_PART_KINDS)}")
            self.parts.append(_PART_KINDS[p.kind](p, dataclasses.replace(self.cfg, task=p.name)))
        self.train_sizes: list[int] | None = None
        self._perms: dict = {}

    def load_model(self, name, dtype="float32", cache=True):
        return self.parts[0].load_model(name, dtype, cache)

    # ---- rows: each part's own (capped, checked) rows, tagged with the part index ----------------------------
    def rows(self):
        per = {"train": {}, "eval": {}}
        for key, part in zip(self.keys, self.parts):
            try:
                r = part.rows()
            except LorakitError as e:
                raise type(e)(f"task '{self.name}', part '{key}' (dataset '{part.spec.dataset}'): {e}") from None
            per["train"][key], per["eval"][key] = r["train"], r["eval"]
        self.train_sizes = [len(v) for v in per["train"].values()]
        self._perms = {}
        self.labels = [f"{k}:{lab}" for k, p in zip(self.keys, self.parts) for lab in p.labels]
        return {s: make_multitask(per[s]) for s in per}

    def encode(self, rows, tok):
        out: list[dict | None] = [None] * len(rows)
        for t, part in enumerate(self.parts):
            idx = [i for i, r in enumerate(rows) if r["task_ids"] == t]
            if idx:
                for i, e in zip(idx, part.encode([rows[i] for i in idx], tok)):
                    out[i] = {**e, "task_ids": t}
        missing = [i for i, e in enumerate(out) if e is None]
        if missing:
            raise ConfigError(f"task '{self.name}': row {missing[0]} has task_ids={rows[missing[0]].get('task_ids')!r}"
                              f"; expected 0..{len(self.parts) - 1}")
        return out

    def collate(self, examples):
        b = self.parts[0].collate(examples)  # every part collates input_ids/attention_mask/labels the same way
        b["task_ids"] = torch.tensor([e["task_ids"] for e in examples], dtype=torch.long)
        b["task_types"] = torch.tensor([self.parts[e["task_ids"]].spec.sample_type for e in examples],
                                       dtype=torch.long)
        return b

    # ---- balanced sampling ---------------------------------------------------------------------------------
    def _perm(self, t: int, epoch: int, seed: int) -> list[int]:
        key = (t, epoch, seed)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + t)
            self._perms[key] = torch.randperm(self.train_sizes[t], generator=g).tolist()
        return self._perms[key]

    def batch_indices(self, i: int, n: int, bs: int, seed: int) -> list[int]:
        """Micro-batch ``i``: slot ``g`` takes task ``g mod T`` and that task's next row (its own reshuffled
        epochs), so every batch holds the tasks in equal shares. A pure function of (i, seed)."""
        if self.train_sizes is None or sum(self.train_sizes) != n:
            raise ConfigError(f"task '{self.name}': batch_indices needs the training rows of rows() "
                              f"({self.train_sizes} rows per part, {n} examples)")
        T = len(self.train_sizes)
        offs = [sum(self.train_sizes[:t]) for t in range(T)]
        out = []
        for g in range(i * bs, (i + 1) * bs):
            t, k = g % T, g // T
            epoch, w = divmod(k, self.train_sizes[t])
            out.append(offs[t] + self._perm(t, epoch, seed)[w])
        return out

    # ---- loss: every example weighs the same -------------------------------------------------------------------
    def forward(self, model, batch):
        from .logits import fast_head, labelled_logprobs, row_sums

        head = fast_head(model)
        if head is not None:  # logits at the labelled tokens only (lorakit.tasks.logits)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                      "labels": batch["labels"]}
            lp, rows, out = labelled_logprobs(model, head, inputs)
            b = batch["labels"].shape[0]
            n = row_sums(torch.ones_like(lp), rows, b)
            per_example = -row_sums(lp, rows, b) / n.clamp(min=1)
            return per_example[n > 0].mean(), out
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, tgt = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                ignore_index=-100, reduction="none").view(tgt.shape)
        n = (tgt != -100).sum(1)
        per_example = nll.sum(1) / n.clamp(min=1)
        return per_example[n > 0].mean(), out

    # ---- evaluation: each part on its rows, routed to its task ------------------------------------------------
    def evaluate(self, model, tok, examples, batch_size=32) -> dict[str, float]:
        m: dict[str, float] = {}
        accs, losses = [], []
        for t, (key, part) in enumerate(zip(self.keys, self.parts)):
            rows = [e for e in examples if e["task_ids"] == t]
            if not rows:
                continue
            with routed(model, t):
                pm = part.evaluate(model, tok, rows, batch_size)
            m.update({f"{key}/{k}": v for k, v in pm.items()})
            m[f"{key}/n"] = float(len(rows))
            losses.append(pm["loss"])
            if part.is_classification:
                accs.append(pm["accuracy"])
        if accs:
            m["mean_accuracy"] = sum(accs) / len(accs)
        m["loss"] = sum(losses) / len(losses) if losses else float("nan")
        return m

    def describe(self) -> dict:
        return {**super().describe(), "parts": {k: p.describe() for k, p in zip(self.keys, self.parts)}}

